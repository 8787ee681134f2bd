"""Backbones from timm and the Hugging Face Hub: construction, pooling, weights, preprocessing.

Weights come through the Hugging Face cache (`HF_HOME`; `HF_HUB_OFFLINE=1` on compute nodes is
honoured), from a local .safetensors/.bin/.pth file, or not at all. Nothing is bundled; gated
models need their licence accepted on the Hub and `HF_TOKEN` where they are fetched.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from cancernet.models.archs import hub_id, hub_model, timm_name
from cancernet.runtime.errors import UserError

log = logging.getLogger(__name__)


class TimmBackbone(nn.Module):
    """A timm model without its classifier: (N, 3, S, S) images -> (N, num_features) features."""

    def __init__(self, model: nn.Module, pool: str = "default", prefix_tokens: int = 1):
        super().__init__()
        self.model, self.pool, self.prefix_tokens = model, pool, prefix_tokens
        self.num_features = 2 * model.num_features if pool == "cls+mean" else model.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "cls+mean":  # Virchow: the class token beside the mean of the patch tokens
            tokens = self.model.forward_features(x)
            return torch.cat([tokens[:, 0], tokens[:, self.prefix_tokens :].mean(1)], dim=-1)
        return self.model(x)  # num_classes=0: timm's pooled features


def _named_layers(kwargs: dict) -> dict:
    """Layer classes the table names as strings (so that the table needs no import of timm)."""
    from timm.layers import SwiGLUPacked

    classes = {"SwiGLUPacked": SwiGLUPacked, "SiLU": nn.SiLU, "GELU": nn.GELU}
    return {k: classes.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}


def _hub_problem(arch: str, e: Exception) -> UserError | None:
    """One clear line for the ways fetching a Hub model fails (offline, gated, missing)."""
    from huggingface_hub import errors

    repo = hub_id(arch) or timm_name(arch)
    fetch = f"`python -m cancernet fetch-weights --arch {arch}`"
    if isinstance(e, errors.GatedRepoError):
        return UserError(
            f"{repo} is gated: accept its licence on its Hugging Face page, set HF_TOKEN, and run {fetch} "
            "on a machine with network"
        )
    if isinstance(e, errors.RepositoryNotFoundError):
        return UserError(
            f"model.arch={arch}: no such repository on the Hugging Face Hub (or it is private: set HF_TOKEN)"
        )
    if isinstance(e, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)) or "offline" in str(e).lower():
        home = os.environ.get("HF_HOME", "~/.cache/huggingface")
        return UserError(
            f"the weights of {arch} are not in the Hugging Face cache ({home}) and the Hub cannot be "
            f"reached: on a machine with network run {fetch}, then copy the cache (or set HF_HOME to a "
            "shared folder), or set model.pretrained to a weights file, or model.pretrained=none"
        )
    return None


def pretrained_cfg(arch: str) -> dict:
    """The pretrained config timm has for arch (mean, std, input_size, ...): from timm's registry,
    or the model's config.json on the Hub (through the cache)."""
    import timm.models

    try:
        if hub_id(arch) is not None:
            cfg, _, _ = timm.models.load_model_config_from_hf(hub_id(arch))
            return dict(cfg)
        found = timm.models.get_pretrained_cfg(timm_name(arch))
        return found.to_dict() if found is not None else {}
    except Exception as e:
        problem = _hub_problem(arch, e)
        if problem is None:
            raise
        raise problem from None


def create(arch: str, pretrained: bool, image_size: int | None) -> TimmBackbone:
    """The backbone of arch, with its own pretrained weights when asked (through the cache)."""
    import timm

    if pretrained and hub_id(arch) is None:
        source = pretrained_cfg(arch)
        if not any(source.get(k) for k in ("hf_hub_id", "url", "file")):  # timm would only warn, then init randomly
            raise UserError(
                f"model.arch={arch}: timm has no pretrained weights for it; name one with a pretrained "
                "tag (timm.list_models(pretrained=True)), or set model.pretrained to a weights file or none"
            )
    known = hub_model(arch)
    kwargs = {**_named_layers(known.kwargs), "num_classes": 0}
    attempts = [kwargs]
    if image_size and "img_size" not in kwargs and not kwargs.get("dynamic_img_size"):
        attempts.insert(0, {**kwargs, "img_size": image_size})  # ViTs size their position embeddings
    for i, attempt in enumerate(attempts):
        try:
            model = timm.create_model(timm_name(arch), pretrained=pretrained, **attempt)
            break
        except TypeError as e:  # a model that takes no img_size (CNNs): build it without
            if i + 1 == len(attempts) or "img_size" not in str(e):
                raise
        except Exception as e:
            problem = _hub_problem(arch, e)
            if problem is not None:
                raise problem from None
            raise
    return TimmBackbone(model, known.pool, known.prefix_tokens)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, .bin, .pth or .pt (a cancernet checkpoint's model too)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state) if isinstance(state, dict) else state


def load_file(backbone: TimmBackbone, path: Path, arch: str) -> None:
    """Load weights from a file into the backbone, refusing ones that do not fit, with one line."""
    state = read_weights(path)
    for prefix in ("net.backbone.model.", "backbone.model.", "model."):  # a cancernet checkpoint, or a wrapper's
        if state and all(k.startswith(prefix) for k in state if not k.startswith("net.head.")):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            break
    own = backbone.model.state_dict()
    classifier = str(getattr(backbone.model, "pretrained_cfg", {}).get("classifier", "head"))
    state = {k: v for k, v in state.items() if k in own or not k.startswith(f"{classifier}.")}  # its own head: ours
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        raise UserError(
            f"model.pretrained={path} does not fit {arch}: mismatched {mismatched[:2]}, missing "
            f"{missing[:2]}, unexpected {unexpected[:2]}"
        )
    backbone.model.load_state_dict(state)
    log.info("%s: weights from %s", arch, path)


def fetch(arch: str) -> Path:
    """Download arch's config and weights into the Hugging Face cache; returns its folder there."""
    from huggingface_hub import snapshot_download

    repo = hub_id(arch) or pretrained_cfg(arch).get("hf_hub_id")
    if not repo:
        raise UserError(f"model.arch={arch}: timm knows no Hugging Face repository for its weights")
    try:
        return Path(snapshot_download(repo.split("@")[0], revision=repo.split("@")[1] if "@" in repo else None))
    except Exception as e:
        problem = _hub_problem(arch, e)
        if problem is None:
            raise
        raise problem from None
