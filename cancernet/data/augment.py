"""Preprocessing and augmentation of uint8 patch batches, on the training device.

`Preprocess` (uint8 in, normalised float out) is the one definition of what the model sees:
training, evaluation, `predict` and `export` all run it. `Augment` adds the random training
transforms around it. Random parameters come from a counter-based hash of (seed, epoch, image
index), so a patch gets the same augmentation on both data paths, whatever the world size,
batch size or worker count. They, and every per-sample matrix made from them, are computed on
the host (numpy: no kernel launches) and sent with the batch; the device runs only the passes
over the pixels (a step on a GPU must not be bound by launching small kernels: `bench ops`).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cancernet.data.config import DataConfig
from cancernet.data.patch import PATCH_SIZE

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# RGB <-> YIQ: hue is a rotation of the (I, Q) chroma plane, so the whole colour jitter is one
# per-sample 3x3 matrix plus an offset (one pass over the pixels).
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_GRAY = torch.tensor([0.299, 0.587, 0.114])
# Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB), as scikit-image's rgb_from_hed.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_LOG_EPS = math.log(1e-6)
# the same, as host arrays (the per-sample matrices are made on the host)
_HOST = {name: m.numpy() for name, m in (("rgb2yiq", _RGB2YIQ), ("gray", _GRAY), ("rgb_from_hed", _RGB_FROM_HED))}
_HOST |= {"yiq2rgb": np.linalg.inv(_HOST["rgb2yiq"]), "hed_from_rgb": np.linalg.inv(_HOST["rgb_from_hed"])}
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
    """(N, count) uniforms in [0, 1), a pure function of (seed, epoch, index[i], column), on
    index's device (the host's draws, `host_uniforms`, are the same numbers)."""
    base = sample_seed(seed, epoch)
    h = _fmix32((index.long() & _MASK32) ^ (base & _MASK32))
    h = _fmix32(h ^ ((base >> 32) & _MASK32))
    columns = (torch.arange(1, count + 1, device=index.device) * 0x9E3779B9) & _MASK32
    return (_fmix32(h[:, None] ^ columns[None, :]) >> 8).float() * 2.0**-24


def _fmix32_host(x: np.ndarray) -> np.ndarray:
    """_fmix32 on uint32 arrays, whose products wrap modulo 2**32 by themselves."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> np.uint32(13))
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> np.uint32(16))


def host_uniforms(index: torch.Tensor | np.ndarray, seed: int, epoch: int, count: int = N_DRAWS) -> np.ndarray:
    """sample_uniforms on the host: the same (N, count) float32 numbers, without a device op."""
    index = (index if index.device.type == "cpu" else index.cpu()).numpy() if isinstance(index, torch.Tensor) else index
    base = sample_seed(seed, epoch)
    h = _fmix32_host((index.astype(np.int64) & _MASK32).astype(np.uint32) ^ np.uint32(base & _MASK32))
    h = _fmix32_host(h ^ np.uint32((base >> 32) & _MASK32))
    columns = ((np.arange(1, count + 1, dtype=np.uint64) * 0x9E3779B9) & _MASK32).astype(np.uint32)
    return (_fmix32_host(h[:, None] ^ columns[None, :]) >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)


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
    """Training transform: uint8 (N, 3, H, W) + image indices (on the host) -> augmented,
    normalised float on the images' device."""

    def __init__(self, cfg: DataConfig, seed: int, channels_last: bool = False):
        super().__init__()
        self.preprocess = Preprocess.from_config(cfg, channels_last=channels_last)
        self.mode, self.seed = cfg.augment, seed
        self.jitter, self.hue = cfg.jitter, cfg.hue
        self.stain, self.stain_sigma, self.stain_bias = cfg.stain, cfg.stain_sigma, cfg.stain_bias
        self._tables: dict = {}  # (side, device) -> the 8 dihedral views' pixel orders
        self.register_buffer("gray_column", _GRAY.view(1, 3, 1), persistent=False)

    def forward(self, images: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
        u = host_uniforms(index, self.seed, epoch)
        to_device = functools.partial(send, device=images.device)
        if self.mode == "dihedral":
            images = self._dihedral(images, to_device(np.floor(u[:, DIHEDRAL] * 8).astype(np.int64)))
        x = self.preprocess.unit(images)
        if self.mode == "seed":
            degrees, flips = (to_device(a) for a in (20 * u[:, ROTATE] - 10, u[:, FLIP] < 0.5))
            x = _rotate_resize(x, degrees, flips, self.preprocess.size)
        else:
            x = self.preprocess.resize(x)
        n, _, h, w = x.shape
        x = x.reshape(n, 3, h * w)  # the colour transforms act on (N, 3, pixels): batched 3x3 products
        if self.stain == "hed":
            matrix, offset = stain_transform(u, self.stain_sigma, self.stain_bias)
            log_rgb = torch.baddbmm(to_device(offset[:, :, None]), to_device(matrix), x.clamp_min(1e-6).log())
            x = log_rgb.exp_().clamp_(0, 1)
        if self.jitter or self.hue:
            matrix, gray_gain = colour_transform(u, self.jitter, self.hue)
            # contrast blends towards the image's mean gray level, a per-sample offset
            mean_gray = (x.mean(-1, keepdim=True) * self.gray_column).sum(1, keepdim=True)  # (N, 1, 1)
            offset = to_device(gray_gain[:, None, None]) * mean_gray
            x = torch.baddbmm(offset, to_device(matrix), x).clamp_(0, 1)
        return self.preprocess.normalise(x.view(n, 3, h, w))

    def _dihedral(self, images: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """dihedral() as one gather: each sample's pixels in its view's order (uint8)."""
        n, c, h, w = images.shape
        key = (h, images.device)
        if key not in self._tables:  # made on the device: no blocking copy, even at the first step
            pixels = torch.arange(h * w, device=images.device).view(1, 1, h, w).expand(8, 1, h, w)
            self._tables[key] = dihedral(pixels, torch.arange(8, device=images.device)).reshape(8, 1, h * w)
        order = self._tables[key][k].expand(n, c, h * w)
        return images.reshape(n, c, h * w).gather(2, order).view(n, c, h, w)


def send(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on the device, without the host waiting (pinned, non-blocking) where it is a GPU."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor if device.type == "cpu" else tensor.pin_memory().to(device, non_blocking=True)


def stain_transform(u: np.ndarray, sigma: float, bias: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample (3x3 matrix, offset) acting on log RGB: each sample's H, E, D stain
    concentrations scaled and shifted (Tellez et al. 2019).

    In scikit-image's convention (row vectors, L = log 1e-6) stains = log(rgb) / L @ hed_from_rgb
    and rgb = exp(stains * L @ rgb_from_hed), so s' = s * alpha + beta is linear in log space:
    log rgb' = log rgb @ (hed_from_rgb diag(alpha) rgb_from_hed) + L * beta @ rgb_from_hed.
    Returned transposed, for column vectors (pixels as columns).
    """
    rgb_from_hed = _HOST["rgb_from_hed"]
    alpha = 1 + sigma * (2 * u[:, STAIN_SCALE] - 1)
    beta = bias * (2 * u[:, STAIN_SHIFT] - 1)
    matrix = (_HOST["hed_from_rgb"] * alpha[:, None, :]) @ rgb_from_hed
    offset = np.float32(_LOG_EPS) * beta @ rgb_from_hed
    return matrix.transpose(0, 2, 1), offset.astype(np.float32)


def colour_transform(u: np.ndarray, jitter: float, hue: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample colour jitter as (3x3 matrix, gray gain): brightness, contrast, saturation and a
    hue rotation of the YIQ chroma plane; x' = matrix @ x + gray_gain * mean gray level of x."""
    brightness, contrast, saturation = (1 - jitter + 2 * jitter * u[:, c] for c in (BRIGHTNESS, CONTRAST, SATURATION))
    angle = (2 * u[:, HUE] - 1) * np.float32(hue * 2 * math.pi)
    gray, rgb2yiq = _HOST["gray"], _HOST["rgb2yiq"]
    # saturation: blend towards per-pixel gray
    sat = saturation[:, None, None] * np.eye(3, dtype=np.float32) + (1 - saturation)[:, None, None] * gray[None, None]
    rot = np.zeros((len(u), 3, 3), np.float32)
    rot[:, 0, 0], rot[:, 1, 1], rot[:, 2, 2] = 1, np.cos(angle), np.cos(angle)
    rot[:, 1, 2], rot[:, 2, 1] = -np.sin(angle), np.sin(angle)
    matrix = brightness[:, None, None] * (_HOST["yiq2rgb"] @ rot @ rgb2yiq @ sat)
    # gray offsets pass unchanged through saturation and hue, so contrast folds in here
    return (contrast[:, None, None] * matrix).astype(np.float32), ((1 - contrast) * brightness).astype(np.float32)


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
