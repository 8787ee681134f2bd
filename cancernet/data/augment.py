"""Augmentation on uint8 image batches, with per-sample random parameters.

One implementation serves both paths: the folder path calls it on single patches in the loader
workers (CPU); the packed path calls it on whole batches on the training device (GPU or CPU).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import DataConfig

# RGB <-> YIQ: hue is a rotation of the (I, Q) chroma plane, so the whole colour jitter is one
# per-sample 3x3 matrix plus an offset (one pass over the pixels).
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)
_GRAY = torch.tensor([0.299, 0.587, 0.114])


class Augment:
    """uint8 (N, 3, H, W) -> normalised float (N, 3, S, S); random only when train=True."""

    def __init__(self, cfg: DataConfig, train: bool, channels_last: bool = False):
        self.mode = cfg.augment if train else "none"
        self.jitter = cfg.jitter if train else 0.0
        self.hue = cfg.hue if train else 0.0
        self.size = cfg.image_size
        self.mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.std).view(1, 3, 1, 1)
        self.channels_last = channels_last

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n, dev = images.shape[0], images.device

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=generator, device=dev)

        if self.mode == "dihedral":
            images = _dihedral(images, torch.randint(0, 8, (n,), generator=generator, device=dev))
        x = images.float().div_(255)
        if self.mode == "seed":
            flip = torch.rand(n, generator=generator, device=dev) < 0.5
            x = _rotate_resize(x, uniform(-10, 10), flip, self.size)
        elif x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                              align_corners=False, antialias=x.shape[-1] > self.size)
        if self.jitter or self.hue:
            x = self._colour_jitter(x, uniform)
        x = (x - self.mean.to(dev)) / self.std.to(dev)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _colour_jitter(self, x: torch.Tensor, uniform) -> torch.Tensor:
        j, dev = self.jitter, x.device
        brightness, contrast, saturation = (uniform(1 - j, 1 + j) for _ in range(3))
        angle = uniform(-self.hue, self.hue) * 2 * math.pi
        gray = _GRAY.to(dev)
        eye = torch.eye(3, device=dev)
        # saturation: blend towards per-pixel gray; brightness: scale
        sat = saturation.view(-1, 1, 1) * eye + (1 - saturation).view(-1, 1, 1) * gray.view(1, 1, 3)
        cos, sin = torch.cos(angle), torch.sin(angle)
        rot = torch.zeros(x.shape[0], 3, 3, device=dev)
        rot[:, 0, 0] = 1
        rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
        hue = _YIQ2RGB.to(dev) @ rot @ _RGB2YIQ.to(dev)
        matrix = brightness.view(-1, 1, 1) * (hue @ sat)
        # contrast: blend towards the image's mean gray level
        mean_gray = torch.einsum("nchw,c->n", x, gray) / (x.shape[-1] * x.shape[-2])
        # gray offsets pass unchanged through saturation and hue, so contrast folds in here
        matrix = contrast.view(-1, 1, 1) * matrix
        offset = ((1 - contrast) * brightness * mean_gray).view(-1, 1, 1, 1)
        out = torch.einsum("nij,njhw->nihw", matrix, x) + offset
        return out.clamp_(0, 1)


def _dihedral(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Apply one of the 8 flips/90-degree rotations per sample: k % 4 quarter turns, k >= 4 flips."""
    out = torch.where((k >= 4).view(-1, 1, 1, 1), x.flip(-1), x)
    turns = k % 4
    for t in (1, 2, 3):
        sel = (turns == t).nonzero().flatten()
        if len(sel):
            out[sel] = torch.rot90(out[sel], t, dims=(-2, -1))
    return out


def _rotate_resize(x: torch.Tensor, degrees: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Rotate by small angles (corners filled black, as torchvision does), flip, resize: one resample."""
    theta = torch.deg2rad(degrees)
    cos, sin = torch.cos(theta), torch.sin(theta)
    sign = torch.where(flip, -1.0, 1.0)
    affine = torch.stack([torch.stack([cos * sign, -sin, torch.zeros_like(cos)], -1),
                          torch.stack([sin * sign, cos, torch.zeros_like(cos)], -1)], 1)
    grid = F.affine_grid(affine, [x.shape[0], 3, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
