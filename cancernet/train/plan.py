"""The run's length: one owner that the sampler, the LR schedule, the loop and the time budget read."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class RunPlan:
    """How many training samples (over all ranks) the run trains: train.epochs whole epochs, or
    what train.time_budget fixed (`budget`: its plan, stored in last.pt so a resumed run keeps it;
    the last epoch may then end early). Only fix() changes it."""

    per_epoch: int  # training samples per full epoch
    max_epochs: int  # train.epochs: the cap, also under a time budget
    budget: dict | None = None

    @property
    def samples(self) -> int:
        return self.budget["samples"] if self.budget is not None else self.per_epoch * self.max_epochs

    @property
    def epochs(self) -> int:
        """Epochs the run trains (the last may be short under a budget)."""
        return self.max_epochs if self.budget is None else math.ceil(self.samples / self.per_epoch)

    def end_in(self, epoch: int) -> int | None:
        """Samples into `epoch` where it ends, when the plan cuts it short; else None (the whole epoch)."""
        if self.budget is None:
            return None
        end = self.samples - epoch * self.per_epoch
        return end if end < self.per_epoch else None

    def fix(self, budget: dict | None) -> None:
        self.budget = budget
