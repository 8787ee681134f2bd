"""The one list of model architectures: torchvision's classification models, timm's models
(`timm:NAME`) and timm models on the Hugging Face Hub (`hf-hub:ORG/NAME`), with the construction
arguments the known pathology foundation models need."""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from cancernet.runtime.errors import ConfigError

TIMM, HUB = "timm:", "hf-hub:"
_HUB_ALIASES = ("hf-hub:", "hf_hub:")  # timm accepts both spellings


@dataclass(frozen=True)
class HubModel:
    """How a pathology foundation model on the Hub must be built and pooled (its model card)."""

    kwargs: dict = field(default_factory=dict)  # timm.create_model arguments ("SwiGLUPacked", "SiLU" by name)
    pool: str = "default"  # default: timm's own pooling; cls+mean: class token and mean of the patch tokens
    prefix_tokens: int = 1  # tokens before the patch tokens (class + registers), for cls+mean


# Checked against public code that follows each model card (docs/MODELS.md says how, and what
# each licence allows); the cards themselves are gated. Keys are lower case.
HUB_MODELS: dict[str, HubModel] = {
    "mahmoodlab/uni": HubModel({"init_values": 1e-5, "dynamic_img_size": True}),
    "mahmoodlab/uni2-h": HubModel(
        {
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "no_embed_class": True,
            "mlp_layer": "SwiGLUPacked",
            "act_layer": "SiLU",
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
    ),
    "paige-ai/virchow": HubModel({"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}, pool="cls+mean", prefix_tokens=1),
    "paige-ai/virchow2": HubModel({"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}, pool="cls+mean", prefix_tokens=5),
    "bioptimus/h-optimus-0": HubModel({"init_values": 1e-5, "dynamic_img_size": False}),
    "prov-gigapath/prov-gigapath": HubModel({}),
}


def hub_id(arch: str) -> str | None:
    """ORG/NAME of an hf-hub: arch, else None."""
    for prefix in _HUB_ALIASES:
        if arch.startswith(prefix):
            return arch[len(prefix) :]
    return None


def timm_name(arch: str) -> str:
    """The name timm.create_model takes: NAME for timm:NAME, hf-hub:ORG/NAME for the Hub."""
    return arch[len(TIMM) :] if arch.startswith(TIMM) else f"{HUB}{hub_id(arch)}"


def hub_model(arch: str) -> HubModel:
    """The known construction of a Hub model, or timm's defaults for an unknown one."""
    return HUB_MODELS.get((hub_id(arch) or "").lower(), HubModel())


@functools.cache
def arch_names() -> tuple[str, ...]:
    """Every classification model torchvision builds (resnet18, densenet121, convnext_tiny, ...)."""
    from torchvision import models

    return tuple(models.list_models(module=models))


def _check_timm(name: str, key: str) -> None:
    import timm

    bare = name[len(TIMM) :]
    if not timm.is_model(bare):
        close = difflib.get_close_matches(bare.split(".")[0], timm.list_models(), n=4, cutoff=0.6)
        hint = f"; did you mean {', '.join(TIMM + c for c in close)}?" if close else ""
        raise ConfigError(f"config key '{key}': {bare!r} is not a timm model (timm.list_models()){hint}")


def _check_hub(name: str, key: str) -> None:
    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+(@[\w.\-]+)?", hub_id(name)):
        raise ConfigError(f"config key '{key}': {name!r} is not of the form hf-hub:ORG/NAME")


def _check_torchvision(name: str, key: str) -> None:
    names = arch_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(names)}"
        raise ConfigError(
            f"config key '{key}': {name!r} is not a torchvision classification model (nor timm:NAME or "
            f"hf-hub:ORG/NAME){hint}"
        )


@dataclass(frozen=True)
class Family:
    """A kind of model.arch name: how it is recognised and checked. Its construction, weights'
    preprocessing and download are models/classifier.py's tables, keyed by `name`."""

    name: str
    prefixes: tuple[str, ...]  # () = the default: a bare name
    check: Callable[[str, str], None]


# The model families, the default last. A new family: one line here, its three functions in
# models/classifier.py (FAMILY_BUILD, FAMILY_PREPROCESSING, FAMILY_FETCH).
FAMILIES = (
    Family("timm", (TIMM,), _check_timm),
    Family("timm", _HUB_ALIASES, _check_hub),  # timm models on the Hugging Face Hub
    Family("torchvision", (), _check_torchvision),
)


def family_of(arch: str) -> Family:
    return next(f for f in FAMILIES if not f.prefixes or arch.startswith(f.prefixes))


def check_arch(name: str, key: str = "model.arch") -> str:
    """name, or a ConfigError naming key and the closest known names."""
    family_of(name).check(name, key)
    return name
