"""Grad-CAM heat maps for class 1 (tumour), from hooks on a backbone stage that can localise.

The last stage of a CNN is too coarse at the sizes cancernet trains at: ResNet18's layer4 is 2x2
at 64 px and 3x3 at 96 px, and a bilinear upsampling of a 2x2 map peaks in a corner whatever the
patch shows. The map is taken at the deepest stage whose output is at least MIN_SIDE cells on a
side (layer3 at 64 and 96 px, layer4 at 224 px), and upsampled bilinearly from cell centres.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cancernet.runtime.errors import UserError

MIN_SIDE = 4


class GradCamUnavailable(UserError):
    """The architecture has no convolutional feature map at its last stage (ViT, Swin)."""


def stage_sides(model: nn.Module, images: torch.Tensor) -> list[tuple[str, nn.Module, int | None]]:
    """(name, stage, the smaller side of its (N, C, h, w) output, or None for other outputs) of
    every backbone stage, from one forward pass of one image."""
    stages, sides, handles = model.stages(), {}, []
    for name, layer in stages:

        def record(module, inputs, out, name=name):
            sides[name] = min(out.shape[-2:]) if isinstance(out, torch.Tensor) and out.dim() == 4 else None

        handles.append(layer.register_forward_hook(record))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(images[:1])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [(name, layer, sides.get(name)) for name, layer in stages]


def target_layer(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """The deepest stage whose feature map has at least MIN_SIDE cells a side at this input size
    (resnet at 64-96 px: layer3), else the last stage (where _check_feature_map says what it is)."""
    stages = stage_sides(model, images)
    if stages[-1][2] is None or stages[-1][2] >= MIN_SIDE:
        return stages[-1][1]
    fine = [layer for _, layer, side in stages if side is not None and side >= MIN_SIDE]
    return fine[-1] if fine else stages[-1][1]


def gradcam(model: nn.Module, images: torch.Tensor, layer: nn.Module | None = None) -> torch.Tensor:
    """(N, H, W) non-negative maps at the input's size: where the class-1 logit's evidence lies.

    Unnormalised, so maps of different patches compare (a negative's map is near zero).
    images: normalised (N, 3, H, W) model inputs. layer: default target_layer(), which
    must output an (N, C, h, w) feature map.
    """
    layer = layer if layer is not None else target_layer(model, images)
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
        raise GradCamUnavailable(
            f"Grad-CAM needs a convolutional feature map; {name}'s last stage outputs "
            f"{'tokens' if isinstance(act, torch.Tensor) else type(act).__name__}"
        )
    # NCHW: spatially smaller than the input in both trailing dims; NHWC (Swin) has channels last
    if act.shape[-1] > x.shape[-1] or act.shape[-2] > x.shape[-2] or act.shape[1] == act.shape[2] != act.shape[3]:
        raise GradCamUnavailable(
            f"Grad-CAM needs an (N, C, h, w) feature map; {name}'s last stage outputs "
            f"{tuple(act.shape)} (channels last)"
        )
