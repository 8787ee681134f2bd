"""The run's length: one owner that the sampler, the LR schedule, the loop and the time budget read."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class RunPlan:
    """How many training samples (over all ranks) the run trains: train.epochs whole epochs, or
    train.steps optimizer steps (`steps_samples`: those steps' samples), or what train.time_budget
    fixed (`budget`: its plan, stored in last.pt so a resumed run keeps it). The last epoch may end
    early. Only fix() changes it."""

    per_epoch: int  # training samples per full epoch
    max_epochs: int  # train.epochs
    budget: dict | None = None
    steps_samples: int | None = None  # train.steps x samples per optimizer step

    @property
    def length(self) -> int:
        """Samples of the configured length (train.steps or train.epochs): a time budget's cap."""
        return self.steps_samples if self.steps_samples is not None else self.per_epoch * self.max_epochs

    @property
    def samples(self) -> int:
        return self.budget["samples"] if self.budget is not None else self.length

    @property
    def epochs(self) -> int:
        """Epochs the run trains (the last may be short)."""
        return math.ceil(self.samples / self.per_epoch)

    def end_in(self, epoch: int) -> int | None:
        """Samples into `epoch` where it ends, when the plan cuts it short; else None (the whole epoch)."""
        end = self.samples - epoch * self.per_epoch
        return end if end < self.per_epoch else None

    def fix(self, budget: dict | None) -> None:
        self.budget = budget
