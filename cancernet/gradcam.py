"""Grad-CAM heat maps for class 1 (tumour), from hooks on the last convolutional block."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gradcam(model: nn.Module, images: torch.Tensor, layer: nn.Module | None = None) -> torch.Tensor:
    """(N, H, W) non-negative maps at the input's size: where the class-1 logit's evidence lies.

    Unnormalised, so maps of different patches compare (a negative's map is near zero).

    images: normalised (N, 3, H, W) model inputs. layer: default the ResNet's layer4.
    """
    layer = layer if layer is not None else model.net.layer4
    saved = {}
    handles = [layer.register_forward_hook(lambda m, i, out: saved.__setitem__("act", out)),
               layer.register_full_backward_hook(lambda m, gi, go: saved.__setitem__("grad", go[0]))]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            x = images.detach().clone().requires_grad_(True)  # hooks need a graph even if frozen
            model.zero_grad(set_to_none=True)
            model(x)[:, 1].sum().backward()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    weights = saved["grad"].mean((2, 3), keepdim=True)
    cam = F.relu((weights * saved["act"]).sum(1, keepdim=True))
    return F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0].detach()
