"""The two kinds of run, decided once (task_kind), and the keys that act on one kind only."""

from __future__ import annotations

import dataclasses
from typing import Any

from cancernet.config.sections import Config, OptimConfig, SlideConfig
from cancernet.runtime.errors import ConfigError

PATCH, SLIDE = "patch", "slide"  # the two kinds of run: patches, or slides as bags of tile features
KIND_NAMES = {PATCH: "patch-level", SLIDE: "slide-level (model.mil)"}


def task_kind(cfg: Config) -> str:
    """The one place a run's kind is decided: slides (bags of stored tile features) when model.mil
    names a slide-level model, else patches."""
    return SLIDE if cfg.model.mil != "none" else PATCH


def _keys(kind: str, why: str, *keys: str) -> dict[str, tuple[str, str]]:
    return {key: (kind, why) for key in keys}


# Keys that act on one kind of run only, and why; every other key acts on both (tests/test_config.py
# holds that list). Set to anything but its default on the other kind, such a key is refused.
ONE_KIND = {
    **_keys(
        PATCH,
        "a slide-level run reads extract-features' files (data.features), not patches",
        *("data.root", "data.format", "data.packed_dir", "data.stage_dir", "data.image_size", "data.crop"),
        *("data.limit", "data.groups_csv", "data.split_by", "data.on_bad_image", "data.verify_ids"),
        *("data.mpp", "data.mean", "data.std"),
    ),
    **_keys(
        PATCH,
        "augmentation acts on patches; a slide-level run trains on features extracted before",
        *("data.augment", "data.jitter", "data.hue", "data.stain", "data.stain_sigma", "data.stain_bias"),
    ),
    **_keys(
        PATCH,
        "a slide-level run trains model.mil on stored features (extract-features chose their backbone)",
        *("model.arch", "model.pretrained", "model.weights_url", "model.freeze_backbone", "model.head"),
        *("model.channels_last", "model.compile", "model.compile_scope", "model.sync_bn"),
    ),
    **_keys(
        PATCH,
        "it shapes the patch classifier's loss and its backbone's stages, which a slide-level model has not",
        "optim.label_smoothing",
        "optim.head_lr_mult",
        "optim.layer_decay",
    ),
    **_keys(
        PATCH,
        "a slide-level run trains and scores one bag (slide) per rank at a time",
        "train.batch_size",
        "train.eval_batch_size",
    ),
    **_keys(
        PATCH,
        "a slide-level run's features are stored already (extract-features)",
        "train.feature_cache",
        "train.feature_cache_dir",
    ),
    **_keys(
        PATCH,
        "it is the whole-slide setting predict-slide takes from a patch checkpoint; a slide-level model "
        "reads the tiles its features were made from",
        *(f"slide.{f.name}" for f in dataclasses.fields(SlideConfig)),
    ),
    **_keys(
        SLIDE,
        "it is read by slide-level runs (model.mil) only",
        "data.features",
        "data.slides_csv",
        "data.max_instances",
    ),
}


def setting(cfg: Config, key: str) -> Any:
    """The value of a dotted key ('train.epochs')."""
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def check_kind(cfg: Config) -> None:
    """Refuse, naming it, a key set on a kind of run it does not act on."""
    kind, defaults = task_kind(cfg), Config()
    for key, (only, why) in ONE_KIND.items():
        if only != kind and setting(cfg, key) != setting(defaults, key):
            raise ConfigError(f"config key '{key}' does not apply to a {KIND_NAMES[kind]} run: {why}")
    o = cfg.optim
    if o.momentum != OptimConfig.momentum and o.name != "sgd":
        raise ConfigError(f"config key 'optim.momentum' acts with optim.name=sgd only (this run: {o.name})")
