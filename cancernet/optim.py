"""Optimizer and learning-rate schedule from the optim config."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=True)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: OptimConfig, optimizer, steps_per_epoch: int, epochs: int):
    """Stepped once per optimizer step."""
    total = max(1, steps_per_epoch * epochs)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LrFactor(cfg.schedule, total, warmup))


class LrFactor:
    """Multiplier on optim.lr: linear warmup, then cosine to 0 (or constant for 'none')."""

    def __init__(self, schedule: str, total_steps: int, warmup_steps: int):
        self.schedule, self.total, self.warmup = schedule, total_steps, warmup_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.schedule == "none":
            return 1.0
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
