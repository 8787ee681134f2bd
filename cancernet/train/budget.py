"""train.time_budget: a run whose length is fixed by the time it may take, not by its epochs.

Measured twice, then fixed. After a short warm-up (WARMUP_STEPS optimizer steps between two sync
points, where the device has caught up, inside the first epoch trained) rank 0 measures training
and evaluation throughput and sets the run's total length in training samples so that training,
the validations and the checkpoints end inside the budget (this works for a budget shorter than
an epoch). The first whole epoch after that, with its validation and its checkpoint (whose
background write slows the next epoch's steps), gives the final estimate: the length is set once
more and is then fixed. Every rank gets rank 0's length. The LR schedule (a function of samples
seen) is laid over it, and the last epoch may be cut short to fit. The plan is stored in the
checkpoint, so a resumed run keeps it. `train.epochs` is the upper bound. The final test
evaluation and the report come after the budget and are not counted in it (their time is logged).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from cancernet.config import parse_duration
from cancernet.engine.predict import autocast
from cancernet.runtime.distributed import broadcast_object

log = logging.getLogger(__name__)
WARMUP_STEPS = 20  # optimizer steps measured (fewer if the epoch ends first)
SAFETY = 0.95  # plan for this share of what is left: validation loaders start, writes compete


@dataclass(frozen=True)
class Shape:
    """What the length depends on, besides the time: all counts in samples over all ranks."""

    per_epoch: int  # training samples per full epoch
    window: int  # samples per optimizer step (global batch x grad_accum): the length's unit
    cap: int  # train.epochs x per_epoch
    eval_every: int


def plan_length(seconds_left: float, position: int, shape: Shape, train_rate: float, val_s: float) -> int:
    """Training samples of the whole run (counted from its start) that fit in seconds_left from
    position, at train_rate samples/s and val_s seconds per validation (the last one included)."""
    left = seconds_left - val_s  # the final validation always runs
    total, epoch = position, position // shape.per_epoch
    while total < shape.cap:
        epoch_end = (epoch + 1) * shape.per_epoch
        cost = (epoch_end - total) / train_rate
        validates = (epoch + 1) % shape.eval_every == 0 and epoch_end < shape.cap
        if cost + (val_s if validates else 0.0) > left:  # the last epoch: as much of it as fits
            windows = max(0.0, left * train_rate) // shape.window
            total += int(windows) * shape.window
            break
        left -= cost + (val_s if validates else 0.0)
        total, epoch = epoch_end, epoch + 1
    total = min(total, shape.cap)
    # at least the window under way: what is trained cannot be untrained
    return max(total, math.ceil((position + 1) / shape.window) * shape.window)


def forward_seconds(model: torch.nn.Module, inputs: torch.Tensor, device: torch.device, amp: str) -> float:
    """Seconds of one evaluation forward over inputs (one warm-up call, one timed)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(device, amp):
            seconds = []
            for _ in range(2):
                start = time.perf_counter()
                model(inputs)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # once per run, outside every training step
                seconds.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return seconds[-1]


class TimeBudget:
    """The planner: its `sync(epoch)` is the training loop's on_sync for that epoch. It reads the
    run (throughput, time spent) and changes only its plan (training.plan.fix)."""

    def __init__(self, training, seconds: float):
        self.training, self.seconds = training, seconds
        sampler, cfg = training.task.sampler, training.cfg
        self.shape = Shape(
            per_epoch=sampler.samples_per_epoch(),
            window=sampler.global_batch * cfg.train.grad_accum,
            cap=training.plan.length,
            eval_every=cfg.train.eval_every,
        )

    @classmethod
    def from_config(cls, training) -> TimeBudget | None:
        budget = training.cfg.train.time_budget
        return cls(training, parse_duration(budget)) if budget else None

    def used_s(self) -> float:
        """Seconds already spent, over all sessions: training, validations and checkpoints."""
        rows = self.training.state.history
        return self.training.state.train_s + sum(
            r["val_s"] + (0.0 if math.isnan(r["ckpt_s"]) else r["ckpt_s"]) for r in rows
        )

    def sync(self, epoch: int):
        """on_sync for this epoch: measures, then plans once; returns where this epoch ends."""
        if self.training.plan.budget is not None:
            return None
        mid, before = self.training.state.mid_epoch, self.used_s()
        # the window starts at the first sync point (the start-up of the loader and the first,
        # slow steps left out); an epoch too short for that is measured whole
        first = {"samples": mid["samples"] if mid else 0, "seconds": 0.0, "synced": False}

        def on_sync(in_epoch: int, elapsed: float, last: bool) -> int | None:
            if self.training.plan.budget is not None:
                return None
            if not first["synced"] and not last:
                first.update(samples=in_epoch, seconds=elapsed, synced=True)
                return None
            if in_epoch - first["samples"] < WARMUP_STEPS * self.shape.window and not last:
                return None
            rate = (in_epoch - first["samples"]) / max(elapsed - first["seconds"], 1e-9)
            self.plan(epoch, epoch * self.shape.per_epoch + in_epoch, before + elapsed, rate)
            return self.training.plan.end_in(epoch)

        return on_sync

    def plan(self, epoch: int, position: int, used: float, train_rate: float) -> None:
        """Fix the run's length on rank 0, give it to every rank, lay the LR schedule over it."""
        training, plan = self.training, None
        if training.dist.is_main:
            val_s = training.task.validation_seconds(training.eval_model)
            samples = plan_length(SAFETY * (self.seconds - used), position, self.shape, train_rate, val_s)
            estimate = used + (samples - position) / train_rate + val_s * self._validations(epoch, samples)
            plan = self._describe(samples, estimate, train_rate, position, final=False, validation_s=round(val_s, 3))
        self._set(plan)

    def refine(self, epoch: int, row: dict) -> None:
        """After each epoch (every rank): the first whole epoch trained under the warm-up's plan
        re-measures the cost of an epoch, validation and checkpoint included, and fixes the length."""
        training, plan = self.training, self.training.plan.budget
        start = epoch * self.shape.per_epoch
        if plan is None or plan["final"] or plan["planned_at_sample"] > start or training.plan.epochs <= epoch + 1:
            return
        new = None
        if training.dist.is_main:
            trained = row["samples_seen"] - start
            rate = trained / row["epoch_s"]
            val_s = row["val_s"] + row["ckpt_s"]
            used = self.used_s()
            samples = plan_length(SAFETY * (self.seconds - used), row["samples_seen"], self.shape, rate, val_s)
            estimate = used + (samples - row["samples_seen"]) / rate + val_s * self._validations(epoch + 1, samples)
            new = self._describe(
                samples,
                estimate,
                rate,
                row["samples_seen"],
                final=True,
                validation_s=round(val_s, 3),
                warmup_samples=plan["samples"],
            )
        self._set(new)

    def _describe(self, samples: int, estimate: float, rate: float, position: int, final: bool, **extra) -> dict:
        plan = {
            "budget_s": self.seconds,
            "samples": samples,
            "epochs": round(samples / self.shape.per_epoch, 3),
            "train_images_per_s": round(rate, 1),
            **extra,
            "estimated_s": round(estimate, 1),
            "planned_at_sample": position,
            "final": final,
        }
        log.info(
            "time budget %s (%s): %.0f %s/s training; the run trains %d samples = %.2f epochs%s, an estimated "
            "%.0f s of training, validation and checkpoints; the LR schedule ends there",
            self.training.cfg.train.time_budget,
            "fixed after a whole epoch" if final else "after the warm-up",
            rate,
            self.training.task.sample_name,
            samples,
            plan["epochs"],
            " (train.epochs caps it)" if samples >= self.shape.cap else "",
            estimate,
        )
        return plan

    def _set(self, plan: dict | None) -> None:
        self.training.plan.fix(
            broadcast_object(plan, self.training.dist)
        )  # rank 0's, on every rank; the schedule reads it

    def _validations(self, epoch: int, samples: int) -> int:
        epochs = math.ceil(samples / self.shape.per_epoch)
        return sum(1 for e in range(epoch, epochs) if (e + 1) % self.shape.eval_every == 0 or e + 1 == epochs)
