"""Exponential moving average of the weights (train.ema_decay), updated without host-device syncs."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    """A copy of the model whose parameters follow ema = d * ema + (1 - d) * weights after each
    optimizer step; buffers (BatchNorm statistics) are copied. d ramps up linearly with the
    training samples seen (all ranks), from 0 to train.ema_decay at train.ema_warmup samples, so
    early averages are not dominated by the random initial weights; a function of the run's
    position, so the same on any world size's schedule and after a resume.

    Every rank applies the same update to the same (all-reduced) weights, so every rank holds
    the same EMA without a collective.
    """

    def __init__(self, model: nn.Module, decay: float, warmup_samples: int = 0):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup_samples, 0
        self.last_decay = 0.0  # the decay of the last update (summary.csv's ema_decay)
        # frozen parameters never move: their average is their value (a frozen ViT-L: 300M left out)
        pairs = [
            (e, m)
            for e, m in zip(self.module.parameters(), model.parameters())
            if m.dtype.is_floating_point and m.requires_grad
        ]
        self._ema_params, self._params = (list(t) for t in zip(*pairs)) if pairs else ([], [])
        buffers = list(zip(self.module.buffers(), model.buffers()))
        self._ema_buffers, self._buffers = (list(t) for t in zip(*buffers)) if buffers else ([], [])

    def decay_at(self, samples: int) -> float:
        """The decay of an update made after `samples` training samples (all ranks)."""
        return self.decay * min(1.0, samples / self.warmup) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, samples: int) -> None:
        """Two foreach kernels (per device and dtype) for all parameters and buffers, not one per
        tensor. samples: the run's position after this optimizer step."""
        self.updates += 1
        self.last_decay = decay = self.decay_at(samples)
        if self._params:
            torch._foreach_lerp_(self._ema_params, self._params, 1 - decay)
        if self._buffers:
            torch._foreach_copy_(self._ema_buffers, self._buffers)

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.updates = state["updates"]
