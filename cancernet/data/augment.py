"""Preprocessing and augmentation of uint8 patch batches, on the training device.

`Preprocess` (uint8 in, normalised float out) is the one definition of what the model sees:
training, evaluation, `predict` and `export` all run it. `Augment` adds the random training
transforms around it. Random parameters come from a counter-based hash of (seed, epoch, image
index), so a patch gets the same augmentation on both data paths, whatever the world size,
batch size or worker count, and drawing them never waits for the device.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import DataConfig
from .patch import PATCH_SIZE

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# RGB <-> YIQ: hue is a rotation of the (I, Q) chroma plane, so the whole colour jitter is one
# per-sample 3x3 matrix plus an offset (one pass over the pixels).
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_GRAY = torch.tensor([0.299, 0.587, 0.114])
# Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB), as scikit-image's rgb_from_hed.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_LOG_EPS = math.log(1e-6)
# Columns of the per-sample random draws
DIHEDRAL, FLIP, ROTATE, BRIGHTNESS, CONTRAST, SATURATION, HUE = range(7)
STAIN_SCALE, STAIN_SHIFT = slice(7, 10), slice(10, 13)
N_DRAWS = 13
_MASK32 = 0xFFFFFFFF


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, ...) that is the same in every process."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for int64 x in [0, 2**32), in 16-bit halves so nothing overflows int64."""
    return (x * (c & 0xFFFF) + ((x * (c >> 16)) & 0xFFFF) * 65536) & _MASK32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: a bijection that scrambles every input bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def sample_uniforms(index: torch.Tensor, seed: int, epoch: int, count: int = N_DRAWS) -> torch.Tensor:
    """(N, count) uniforms in [0, 1), a pure function of (seed, epoch, index[i], column)."""
    base = sample_seed(seed, epoch)
    h = _fmix32((index.long() & _MASK32) ^ (base & _MASK32))
    h = _fmix32(h ^ ((base >> 32) & _MASK32))
    columns = (torch.arange(1, count + 1, device=index.device) * 0x9E3779B9) & _MASK32
    return (_fmix32(h[:, None] ^ columns[None, :]) >> 8).float() * 2.0**-24


class Preprocess(nn.Module):
    """uint8 patches (N, 3, H, W), or (N, H, W, 3) with nhwc=True -> normalised float (N, 3, S, S).

    crop: the side of the centre square kept before resizing (the label is about the centre
    32x32; a 64 px crop keeps 16 px of context around it at full resolution).
    """

    def __init__(
        self,
        size: int,
        mean: list[float],
        std: list[float],
        nhwc: bool = False,
        channels_last: bool = False,
        crop: int | None = None,
    ):
        super().__init__()
        self.size, self.nhwc, self.channels_last, self.crop = size, nhwc, channels_last, crop
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_config(cls, cfg: DataConfig, **kwargs) -> Preprocess:
        """A run resolves null mean/std/size to its weights' first (models.resolve_preprocessing);
        unresolved, they are ImageNet's statistics (torchvision's weights) at the native 96 px."""
        mean, std = cfg.mean or IMAGENET_MEAN, cfg.std or IMAGENET_STD
        return cls(cfg.image_size or PATCH_SIZE, list(mean), list(std), crop=cfg.crop, **kwargs)

    def unit(self, images: torch.Tensor) -> torch.Tensor:
        """Float NCHW in [0, 1], cut to the centre crop."""
        x = images.permute(0, 3, 1, 2) if self.nhwc else images
        if self.crop and self.crop < x.shape[-1]:
            start = (x.shape[-1] - self.crop) // 2
            x = x[..., start : start + self.crop, start : start + self.crop]
        return x.float() / 255

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == self.size:
            return x
        return F.interpolate(
            x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > self.size
        )

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        # batches arrive NHWC-strided (uint8 patches are stored HWC): without this, cuDNN would
        # convert the weights at every call when the model is NCHW
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.normalise(self.resize(self.unit(images)))


class Augment(nn.Module):
    """Training transform: uint8 (N, 3, H, W) + image indices -> augmented, normalised float."""

    def __init__(self, cfg: DataConfig, seed: int, channels_last: bool = False):
        super().__init__()
        self.preprocess = Preprocess.from_config(cfg, channels_last=channels_last)
        self.mode, self.seed = cfg.augment, seed
        self.jitter, self.hue = cfg.jitter, cfg.hue
        self.stain, self.stain_sigma, self.stain_bias = cfg.stain, cfg.stain_sigma, cfg.stain_bias
        for name, value in (
            ("rgb2yiq", _RGB2YIQ),
            ("yiq2rgb", torch.linalg.inv(_RGB2YIQ)),
            ("gray", _GRAY),
            ("rgb_from_hed", _RGB_FROM_HED),
            ("hed_from_rgb", torch.linalg.inv(_RGB_FROM_HED)),
        ):
            self.register_buffer(name, value, persistent=False)

    def forward(self, images: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
        u = sample_uniforms(index, self.seed, epoch)
        if self.mode == "dihedral":
            images = dihedral(images, (u[:, DIHEDRAL] * 8).long())
        x = self.preprocess.unit(images)
        if self.mode == "seed":
            x = _rotate_resize(x, 20 * u[:, ROTATE] - 10, u[:, FLIP] < 0.5, self.preprocess.size)
        else:
            x = self.preprocess.resize(x)
        if self.stain == "hed":
            x = self._stain(x, u)
        if self.jitter or self.hue:
            x = self._colour_jitter(x, u)
        return self.preprocess.normalise(x)

    def _stain(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Scale and shift each sample's H, E, D stain concentrations (Tellez et al. 2019).

        In scikit-image's convention (row vectors, L = log 1e-6) stains = log(rgb) / L @ hed_from_rgb
        and rgb = exp(stains * L @ rgb_from_hed), so s' = s * alpha + beta is linear in log space:
        log rgb' = log rgb @ (hed_from_rgb diag(alpha) rgb_from_hed) + L * beta @ rgb_from_hed.
        """
        alpha = 1 + self.stain_sigma * (2 * u[:, STAIN_SCALE] - 1)
        beta = self.stain_bias * (2 * u[:, STAIN_SHIFT] - 1)
        matrix = (self.hed_from_rgb * alpha[:, None, :]) @ self.rgb_from_hed  # (N, 3, 3)
        offset = _LOG_EPS * beta @ self.rgb_from_hed  # (N, 3)
        log_rgb = torch.einsum("nchw,ncd->ndhw", x.clamp_min(1e-6).log(), matrix)
        return (log_rgb + offset[:, :, None, None]).exp().clamp_(0, 1)

    def _colour_jitter(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        j = self.jitter
        brightness, contrast, saturation = (1 - j + 2 * j * u[:, c] for c in (BRIGHTNESS, CONTRAST, SATURATION))
        angle = (2 * u[:, HUE] - 1) * self.hue * 2 * math.pi
        eye = torch.eye(3, device=x.device)
        # saturation: blend towards per-pixel gray; brightness: scale
        sat = saturation.view(-1, 1, 1) * eye + (1 - saturation).view(-1, 1, 1) * self.gray.view(1, 1, 3)
        cos, sin, zero, one = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle), torch.ones_like(angle)
        rot = torch.stack(
            [torch.stack([one, zero, zero], -1), torch.stack([zero, cos, -sin], -1), torch.stack([zero, sin, cos], -1)],
            1,
        )
        matrix = brightness.view(-1, 1, 1) * (self.yiq2rgb @ rot @ self.rgb2yiq @ sat)
        # contrast: blend towards the image's mean gray level; gray offsets pass unchanged through
        # saturation and hue, so contrast folds in here
        mean_gray = torch.einsum("nchw,c->n", x, self.gray) / (x.shape[-1] * x.shape[-2])
        matrix = contrast.view(-1, 1, 1) * matrix
        offset = ((1 - contrast) * brightness * mean_gray).view(-1, 1, 1, 1)
        return (torch.einsum("nij,njhw->nihw", matrix, x) + offset).clamp_(0, 1)


def dihedral(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Sample i gets view k[i] of 8: a horizontal flip when k >= 4, then k % 4 quarter turns.

    Every turn is computed for the whole batch and picked with torch.where, so nothing waits
    for the device (indexing with nonzero() would).
    """
    x = torch.where((k >= 4).view(-1, 1, 1, 1), x.flip(-1), x)
    turns = (k % 4).view(-1, 1, 1, 1)
    out = x
    for t in (1, 2, 3):
        out = torch.where(turns == t, torch.rot90(x, t, dims=(-2, -1)), out)
    return out


def dihedral_views(images: torch.Tensor) -> list[torch.Tensor]:
    """The 8 views of a square NCHW batch, in the order of `dihedral`'s k (test-time augmentation)."""
    flipped = images.flip(-1)
    return [torch.rot90(base, t, dims=(-2, -1)) for base in (images, flipped) for t in range(4)]


def _rotate_resize(x: torch.Tensor, degrees: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Rotate by small angles (corners filled black, as torchvision does), flip, resize: one resample."""
    theta = torch.deg2rad(degrees)
    cos, sin = torch.cos(theta), torch.sin(theta)
    sign = torch.where(flip, -1.0, 1.0)
    affine = torch.stack(
        [
            torch.stack([cos * sign, -sin, torch.zeros_like(cos)], -1),
            torch.stack([sin * sign, cos, torch.zeros_like(cos)], -1),
        ],
        1,
    )
    grid = F.affine_grid(affine, [x.shape[0], 3, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
