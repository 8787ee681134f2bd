"""What a kind of example brings to the one training run: its data, model, loss and evaluation.

A run of either kind goes through the same loop, run state, run plan and time budget, LR
schedule, EMA, GradScaler, checkpointer, W&B and summary.csv (train/runner.py, train/state.py).
Only the task differs: a patch task (train/patch_task.py) reads patches, augments them and trains
a classifier with cross-entropy; a slide task (train/slide_task.py) reads one slide's tile
features as a bag and trains a slide-level (MIL) model with its own loss. config.task_kind
decides which, once.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from cancernet.config import PATCH, Config, task_kind


class Task(Protocol):
    kind: str  # config.PATCH or config.SLIDE
    sample_name: str  # what a training sample is called in log lines ("img", "bags")
    table: pd.DataFrame  # id, label, split (and fold, group): what splits.csv records
    model: nn.Module  # what checkpoints and evaluation hold (the bare model)
    trained: nn.Module  # what runs on the training loader's inputs (the model, or a part of it)
    sampler: object  # the training order: set_epoch(epoch, offset, end), global_batch, samples_per_epoch()
    train_loader: DataLoader

    def loss_module(self, trained: nn.Module) -> nn.Module:
        """A module whose forward(inputs, labels) gives (loss, correct predictions): what the loop
        calls (DDP wraps it, so losses computed inside, instance losses too, synchronise)."""

    def inputs(self, batch, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch's inputs and labels on the device (never waiting for it)."""

    def validate(self, eval_model: nn.Module) -> dict[str, np.ndarray] | pd.DataFrame:
        """label, prob and loss of every validation sample, on every rank (a collective)."""

    def validation_seconds(self, eval_model: nn.Module) -> float:
        """One validation's seconds, estimated on rank 0 (the time budget's plan)."""

    def facts(self) -> dict:
        """What both checkpoints record besides weights and config (the task, what its inputs are)."""

    def test(self, training, tracker, extra_facts: dict) -> dict | None:
        """The final report: best.pt on the test split (every rank; rank 0 writes)."""


def task_class(cfg: Config) -> type:
    """The task of a run's kind (config.task_kind)."""
    if task_kind(cfg) == PATCH:
        from cancernet.train.patch_task import PatchTask

        return PatchTask
    from cancernet.train.slide_task import SlideTask

    return SlideTask
