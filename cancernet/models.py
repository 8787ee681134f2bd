"""Backbone registry, classifier heads, freezing and pretrained-weight loading."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from .config import ModelConfig
from .errors import UserError

log = logging.getLogger(__name__)

ARCHS = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2),
}


class PatchClassifier(nn.Module):
    """A torchvision ResNet whose fc is the chosen head; a frozen backbone stays in eval mode."""

    def __init__(self, net: nn.Module, freeze_backbone: bool):
        super().__init__()
        self.net = net
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            for name, p in net.named_parameters():
                p.requires_grad_(name.startswith("fc."))

    def train(self, mode: bool = True) -> "PatchClassifier":
        super().train(mode)
        if self.freeze_backbone:  # frozen BatchNorm must keep its ImageNet running statistics
            for name, module in self.net.named_children():
                module.train(mode and name == "fc")
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_head(kind: str, features: int) -> nn.Module:
    if kind == "seed":  # the original recipe's head
        return nn.Sequential(nn.Dropout(0.5), nn.Linear(features, 128), nn.ReLU(inplace=True),
                             nn.Dropout(0.3), nn.Linear(128, 2))
    return nn.Linear(features, 2)


def imagenet_state_dict(arch: str, mirror: str | None = None) -> dict[str, torch.Tensor]:
    """ImageNet weights through torchvision's weights API and torch.hub cache ($TORCH_HOME).

    mirror: a base URL (http://, https://, file://) holding the same file names, for clusters
    that mirror the weights internally.
    """
    weights = ARCHS[arch][1]
    url = weights.url if mirror is None else f"{mirror.rstrip('/')}/{weights.url.rsplit('/', 1)[1]}"
    try:
        return torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True,
                                                  map_location="cpu", weights_only=True)
    except Exception as e:  # URLError, timeouts, hash mismatch: all mean "not available here"
        cache = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
        raise UserError(
            f"cannot get ImageNet weights for {arch} from {url} ({e}). On a machine with network run "
            f"`python -m cancernet fetch-weights --arch {arch}` and copy {cache.name} to {cache} "
            f"here (or set TORCH_HOME to a shared folder that holds hub/checkpoints/{cache.name}); "
            "or set model.pretrained to a state-dict path, or model.pretrained=none") from None


def _load_backbone_weights(net: nn.Module, cfg: ModelConfig) -> None:
    if cfg.pretrained == "none":
        return
    if cfg.pretrained == "imagenet":
        state = imagenet_state_dict(cfg.arch, cfg.weights_url)
    else:
        path = Path(os.path.expanduser(cfg.pretrained))
        if not path.is_file():
            raise UserError(f"model.pretrained: {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state)  # a cancernet checkpoint or a bare state dict
        state = {k.removeprefix("net."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the head is ours
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch
        missing, unexpected = [str(e).splitlines()[1].strip()], []
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise UserError(f"model.pretrained={cfg.pretrained} does not fit {cfg.arch}: "
                        f"missing/mismatched {missing[:2]}, unexpected {unexpected[:2]}")


def build_model(cfg: ModelConfig) -> PatchClassifier:
    factory = ARCHS[cfg.arch][0]
    net = factory(weights=None)
    _load_backbone_weights(net, cfg)
    net.fc = make_head(cfg.head, net.fc.in_features)
    model = PatchClassifier(net, cfg.freeze_backbone)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
