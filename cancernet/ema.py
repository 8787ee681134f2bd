"""Exponential moving average of the weights (train.ema_decay), updated without host-device syncs."""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    """A copy of the model whose parameters follow ema = d * ema + (1 - d) * weights after each
    optimizer step; buffers (BatchNorm statistics) are copied. d ramps up as (1 + t) / (10 + t)
    to train.ema_decay, so early averages are not dominated by the random initial weights.

    Every rank applies the same update to the same (all-reduced) weights, so every rank holds
    the same EMA without a collective.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0
        self._pairs = [(e, m) for e, m in zip(self.module.parameters(), model.parameters())
                       if m.dtype.is_floating_point]
        self._buffers = list(zip(self.module.buffers(), model.buffers()))

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        if self._pairs:
            ema, weights = zip(*self._pairs)
            torch._foreach_lerp_(list(ema), list(weights), 1 - decay)
        for ema_buffer, buffer in self._buffers:
            ema_buffer.copy_(buffer)

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.updates = state["updates"]
