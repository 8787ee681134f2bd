"""Typed run configuration: dataclasses, YAML loading, dotted overrides, validation."""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cancernet.data.config import DataConfig
from cancernet.data.formats import check_format, format_of
from cancernet.models.archs import check_arch
from cancernet.models.config import ModelConfig
from cancernet.runtime.errors import ConfigError
from cancernet.runtime.schema import bounded, choice

__all__ = ["Config", "ConfigError", "load_config", "from_dict", "resolved_yaml", "task_kind", "PATCH", "SLIDE"]
PATCH, SLIDE = "patch", "slide"  # the two kinds of run: patches, or slides as bags of tile features
KIND_NAMES = {PATCH: "patch-level", SLIDE: "slide-level (model.mil)"}


@dataclass
class OptimConfig:
    name: str = choice("adamw", "adam", "adamw", "sgd")
    lr: float = bounded(1e-3, 0)
    lr_scale: str = choice("none", "none", "linear", "sqrt")  # lr x (global batch / base_batch), or its root
    max_lr: float | None = bounded(None, 0)  # cap on the scaled lr (null: none)
    base_batch: int = bounded(256, 1)
    weight_decay: float = bounded(1e-4, 0)
    decay_norm_bias: bool = False  # weight decay on normalisation weights and biases too
    momentum: float = bounded(0.9, 0, 1)
    schedule: str = choice("cosine", "cosine", "onecycle", "none")
    warmup_epochs: float = bounded(0.0, 0)
    label_smoothing: float = bounded(0.0, 0, 1, hi_open=True)
    head_lr_mult: float = bounded(1.0, 0)  # head LR = lr x head_lr_mult
    layer_decay: float = bounded(1.0, 0, 1)  # layer-wise LR decay over the backbone's stages; 1 = off


@dataclass
class TrainConfig:
    epochs: int = bounded(10, 1)
    batch_size: int = bounded(256, 1)  # per process
    eval_batch_size: int = bounded(512, 1)
    grad_accum: int = bounded(1, 1)
    clip_grad: float | None = bounded(None, 0)
    amp: str = choice("auto", "auto", "bf16", "fp16", "off")  # on every device; auto: the fastest correct one
    deterministic: bool = False  # repeatable kernels (no cuDNN autotuning), slower on GPUs
    feature_cache: str = choice("auto", "auto", "on", "off")  # frozen backbone: its features computed once
    feature_cache_dir: str | None = None  # default: <data.root>/features (shared by all ranks)
    time_budget: str | None = field(default=None, metadata={"check": "duration"})  # e.g. 14m, 4h: fixes the length
    # last.pt at most this often (e.g. 10m; null: every epoch); the final epoch and a stop always save
    checkpoint_every: str | None = field(default=None, metadata={"check": "duration"})
    select_metric: str = choice("val_auc", "val_auc", "val_loss", "val_acc")  # what makes best.pt the best
    ema_decay: float = bounded(0.0, 0, 1, hi_open=True)  # EMA of the weights; 0 = off
    ema_warmup: int = bounded(0, 0)  # training samples over which the EMA's decay ramps up from 0; 0 = none
    device: str = choice("auto", "auto", "cpu", "cuda")
    out_dir: str = "runs/default"
    resume: str = "auto"  # auto | none | path to a checkpoint
    overwrite: bool = False  # a fresh run (resume=none) may replace the run files in out_dir
    seed: int = 0
    eval_every: int = bounded(1, 1)  # validate every N epochs, and always after the last
    log_every: int = bounded(50, 0)  # steps between log lines when no progress bar is shown
    sync_every: int = bounded(10, 1)  # optimizer steps between the all-ranks check for stop / NaN loss
    progress: str = choice("auto", "auto", "on", "off")


@dataclass
class DistConfig:
    backend: str = choice("auto", "auto", "nccl", "gloo")
    timeout_min: int = bounded(30, 1)


@dataclass
class WandbConfig:
    mode: str = choice("disabled", "online", "offline", "disabled")
    project: str = "cancernet"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    log_model: bool = False  # upload best.pt (weights only) as a model artifact
    init_timeout: float = bounded(20.0, 1)  # seconds the online start may take before falling back


@dataclass
class ReportConfig:
    bootstrap: int = bounded(1000, 0)  # resamples for the 95% CIs; 0 = none
    calibrate: bool = True  # fit a temperature on validation predictions after training
    figures: bool = True  # write the report figures (metrics.json and predictions always)


@dataclass
class SlideConfig:
    """Whole-slide inference (predict-slide, evaluate-slides); lengths in training pixels."""

    stride: int = bounded(32, 1)  # tile step; each tile's score fills the stride x stride cell at its centre
    tissue_mpp: float = bounded(8.0, 0)  # resolution of the tissue mask (microns per pixel)
    min_saturation: float = bounded(0.05, 0, 1)  # floor under Otsu's saturation threshold (near-empty slides)
    fill_holes_um2: float = bounded(20000.0, 0)  # holes in the tissue up to this area are tissue
    min_tissue: float = bounded(0.25, 0, 1, hi_open=True)  # tissue share a cell needs to be scored
    block: int = bounded(8, 1)  # cells per side read as one region (tiles overlap: one read serves many)
    top_k: int = bounded(20, 1)  # slide score: mean of the top-k cells
    score: str = choice("top_k_mean", "top_k_mean", "max")

    def __post_init__(self):
        if self.stride % 2:
            raise ConfigError(
                f"config key 'slide.stride': {self.stride} is odd; 96 px tiles centre on their cells "
                "only with an even stride"
            )


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    slide: SlideConfig = field(default_factory=SlideConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


def _check_range(key: str, value: Any, bounds: tuple) -> None:
    lo, hi, hi_open = bounds
    if value is None:
        return
    if lo is not None and value < lo or hi is not None and (value >= hi if hi_open else value > hi):
        interval = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}{')' if hi_open else ']'}"
        raise ConfigError(f"config key '{key}': {value!r} is outside {interval}")


def _check_value(key: str, value: Any, hint: Any, meta: typing.Mapping) -> Any:
    """Return value converted to the field's type, or raise ConfigError naming key."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _check_value(key, value, args[0], meta)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_check_value(f"{key}[{i}]", v, item, {}) for i, v in enumerate(value)]
    if hint is str and isinstance(value, bool) and {"on", "off"} & set(meta.get("choices", ())):
        value = "on" if value else "off"  # YAML 1.1 reads train.amp=off as False
    if meta.get("check") == "duration" and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # train.time_budget=600: seconds
    if hint is float and isinstance(value, str):
        with contextlib.suppress(ValueError):  # YAML 1.1 reads 1e-3 (no dot) as a string
            value = float(value)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[hint]
    if not ok:
        raise ConfigError(f"config key '{key}': expected {hint.__name__}, got {value!r}")
    value = float(value) if hint is float else value
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"config key '{key}': {value!r} is not one of {list(choices)}")
    if "range" in meta:
        _check_range(key, value, meta["range"])
    if meta.get("check") == "duration":
        parse_duration(value, key)
    return value


def parse_duration(text: str, key: str = "train.time_budget") -> float:
    """Seconds in '90s', '14m', '4h', '1h30m' or a plain number of seconds; ConfigError naming key."""
    import re

    text = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        seconds = float(text)
    else:
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", text)
        if not text or not parts:
            raise ConfigError(f"config key '{key}': {text!r} is not a duration (e.g. 90s, 14m, 4h, 1h30m)")
        hours, minutes, secs = (float(p) if p else 0.0 for p in parts.groups())
        seconds = 3600 * hours + 60 * minutes + secs
    if seconds <= 0:
        raise ConfigError(f"config key '{key}': {text!r} must be above zero")
    return seconds


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise ConfigError(f"unknown config key '{key}' (known: {', '.join(fields)})")
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}': expected a section, got {value!r}")
            kwargs[name] = _build(hint, value, f"{key}.")
        else:
            kwargs[name] = _check_value(key, value, hint, fields[name].metadata)
    return cls(**kwargs)


def check(cfg: Config) -> Config:
    """The checks a section's own fields cannot make: the registries of data formats and model
    families, and settings that span several keys. Each error names a key, before any data is read."""
    check_format(cfg.data.format, "data.format")
    check_arch(cfg.model.arch, "model.arch")
    check_kind(cfg)
    d, t = cfg.data, cfg.train
    if format_of(d).source.fixed_splits:
        name = format_of(d).source.name
        for key in ("val_fraction", "test_fraction"):
            if getattr(d, key) != getattr(DataConfig, key):
                raise ConfigError(
                    f"config key 'data.{key}' does not apply to data.format={d.format}: the {name}'s "
                    "own train/valid/test splits are used"
                )
        if d.groups_csv:
            raise ConfigError(
                f"config key 'data.groups_csv' does not apply to data.format={d.format}: slide ids come from the {name}"
            )
    else:
        for key in ("val_fraction", "test_fraction"):
            if getattr(d, key) <= 0:
                raise ConfigError(
                    f"config key 'data.{key}' must be above 0: training needs a validation split "
                    "(best checkpoint) and a test split (final evaluation)"
                )
        if d.val_fraction + d.test_fraction >= 1:
            raise ConfigError("config keys 'data.val_fraction' + 'data.test_fraction' must sum below 1")
        if d.fold >= d.folds and d.folds > 1 or d.fold and d.folds == 1:
            raise ConfigError(f"config key 'data.fold': {d.fold} is not one of the {d.folds} folds (0..{d.folds - 1})")
        unused = [
            k
            for k, on in (
                ("val_fraction", d.folds > 1 or d.split_by == "pcam"),
                ("test_fraction", d.split_by == "pcam"),
            )
            if on and getattr(d, k) != getattr(DataConfig, k)
        ]
        if unused:
            raise ConfigError(
                f"config key 'data.{unused[0]}' does not apply here: with data.folds > 1 validation is "
                "one fold of the rest, and data.split_by=pcam takes PCam's own splits"
            )
    if d.mean is not None and len(d.mean) != 3 or d.std is not None and (len(d.std) != 3 or min(d.std) <= 0):
        raise ConfigError("config keys 'data.mean'/'data.std' need 3 values each (RGB), std above 0")
    if t.resume not in ("auto", "none") and not Path(t.resume).is_file():
        raise ConfigError(f"config key 'train.resume': {t.resume} is neither auto, none nor a checkpoint file")
    return cfg


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ['train.epochs=2', ...] into a nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier one")
        try:
            node[leaf] = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            raise ConfigError(f"override '{item}': the value is not a YAML scalar") from None
    return nested


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def from_dict(values: dict[str, Any]) -> Config:
    return _build(Config, values, "")


SHIPPED = Path(__file__).parent / "configs"  # configs/ of the repository, installed with the package


def config_path(name: str | Path) -> Path:
    """A config file, or the name of a shipped one (`base`, `base.yaml`: cancernet/configs/)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = SHIPPED / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.yaml")))
    raise ConfigError(f"config file {path} does not exist (shipped configs: {known})")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (or the defaults when path is None) and apply key=value overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = config_path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping of sections (data:, model:, ...), "
                f"not a {type(values).__name__}"
            )
        values.pop("meta", None)  # written by resolved_yaml; not a setting
    return check(from_dict(merge(values, parse_overrides(list(overrides)))))


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).resolve().parent, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def resolved_yaml(cfg: Config, world_size: int, extra_meta: dict | None = None) -> str:
    """The config as run, plus what produced it (git commit, torch version, world size)."""
    import torch

    meta = {"git_commit": git_commit(), "torch": str(torch.__version__), "world_size": world_size, **(extra_meta or {})}
    return yaml.safe_dump({**cfg.to_dict(), "meta": meta}, sort_keys=False)
