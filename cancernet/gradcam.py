"""Grad-CAM heat maps for class 1 (tumour), from hooks on the backbone's last stage."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError


class GradCamUnavailable(UserError):
    """The architecture has no convolutional feature map at its last stage (ViT, Swin)."""


def target_layer(model: nn.Module) -> nn.Module:
    """The last backbone stage (resnet: layer4, densenet: features.norm5, convnext: features.7)."""
    name, layer = model.stages()[-1]
    return layer


def gradcam(model: nn.Module, images: torch.Tensor, layer: nn.Module | None = None) -> torch.Tensor:
    """(N, H, W) non-negative maps at the input's size: where the class-1 logit's evidence lies.

    Unnormalised, so maps of different patches compare (a negative's map is near zero).
    images: normalised (N, 3, H, W) model inputs. layer: default the backbone's last stage, which
    must output an (N, C, h, w) feature map.
    """
    layer = layer if layer is not None else target_layer(model)
    saved = {}

    def keep(module, inputs, out):
        if isinstance(out, torch.Tensor):
            # a tensor hook, not a module backward hook: densenet applies an in-place ReLU next,
            # and the hook still receives the gradient of the value before it
            saved["act"] = out.detach().clone()
            out.register_hook(lambda grad: saved.__setitem__("grad", grad))
        else:
            saved["act"] = out
    handles = [layer.register_forward_hook(keep)]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            x = images.detach().clone().requires_grad_(True)  # hooks need a graph even if frozen
            model.zero_grad(set_to_none=True)
            logits = model(x)
            _check_feature_map(saved.get("act"), x, model)
            logits[:, 1].sum().backward()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    weights = saved["grad"].mean((2, 3), keepdim=True)
    cam = F.relu((weights * saved["act"]).sum(1, keepdim=True))
    return F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0].detach()


def _check_feature_map(act, x: torch.Tensor, model: nn.Module) -> None:
    name = type(getattr(model, "net", model)).__name__
    if not isinstance(act, torch.Tensor) or act.dim() != 4:
        raise GradCamUnavailable(f"Grad-CAM needs a convolutional feature map; {name}'s last stage outputs "
                                 f"{'tokens' if isinstance(act, torch.Tensor) else type(act).__name__}")
    # NCHW: spatially smaller than the input in both trailing dims; NHWC (Swin) has channels last
    if act.shape[-1] > x.shape[-1] or act.shape[-2] > x.shape[-2] or act.shape[1] == act.shape[2] != act.shape[3]:
        raise GradCamUnavailable(f"Grad-CAM needs an (N, C, h, w) feature map; {name}'s last stage outputs "
                                 f"{tuple(act.shape)} (channels last)")
