"""train_one_epoch: the training loop over a loader (no file I/O), for every kind of run.

The task (train/task.py) turns a batch into the device's inputs and labels; the model the loop
calls is the task's loss module (DDP-wrapped under torchrun), which returns the loss and the
number of correct predictions. Inside a training step the host never waits for the device:
counts are kept on the host, sums on the device, and both are read together every
`train.sync_every` optimizer steps.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from cancernet.config import Config
from cancernet.engine.predict import autocast
from cancernet.runtime.distributed import DistInfo, all_reduce_sum
from cancernet.runtime.errors import NonFiniteLossError
from cancernet.runtime.signals import StopFlag
from cancernet.train.ema import ModelEma
from cancernet.train.optim import LrSchedule

log = logging.getLogger(__name__)


@dataclass
class EpochTotals:
    """Sums over the training samples of one epoch, all ranks together."""

    loss_sum: float = 0.0
    correct: float = 0.0
    seen: int = 0

    def __add__(self, other: EpochTotals) -> EpochTotals:
        return EpochTotals(self.loss_sum + other.loss_sum, self.correct + other.correct, self.seen + other.seen)

    @property
    def train_loss(self) -> float:
        return self.loss_sum / max(self.seen, 1)

    @property
    def train_acc(self) -> float:
        return self.correct / max(self.seen, 1)


@dataclass
class MidEpoch:
    """Where a stopped epoch was: samples trained (all ranks) and their totals."""

    samples: int
    totals: EpochTotals = field(default_factory=EpochTotals)


@dataclass
class EpochStats:
    totals: EpochTotals  # the whole epoch, including what a resumed run trained before
    images: int  # trained in this process' session (for throughput)
    seconds: float
    position: int  # samples seen since the run began, after this epoch
    stopped_at: int | None = None  # samples into the epoch when a stop request ended it


@dataclass
class StepParts:
    """What one optimizer step touches (its settings come from the config)."""

    model: nn.Module  # what the loop calls, (inputs, labels) -> (loss, correct): the task's loss module, wrapped
    optimizer: torch.optim.Optimizer
    schedule: LrSchedule
    scaler: torch.amp.GradScaler
    ema: ModelEma | None = None


class DeviceSums:
    """loss sum and correct predictions: accumulated on the device (two in-place adds a step),
    read only at sync points. A non-finite loss makes the sum non-finite, which the read sees."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, loss: torch.Tensor, correct: torch.Tensor, samples: int) -> None:
        self.loss_sum.add_(loss, alpha=samples)
        self.correct.add_(correct)

    def reduced(self, dist: DistInfo, stop: bool = False) -> tuple[float, float, bool, bool]:
        """(loss sum, correct, a loss was non-finite, any rank asked to stop): all ranks', on the host."""
        stop_flag = torch.tensor(float(stop), dtype=torch.float64, device=self.loss_sum.device)
        flags = torch.stack([self.loss_sum, self.correct.double(), stop_flag])
        loss_sum, correct, stops = all_reduce_sum(flags, dist).tolist()
        return loss_sum, correct, not math.isfinite(loss_sum), stops > 0


def train_one_epoch(
    parts: StepParts,
    loader,
    task,
    config: Config,
    dist: DistInfo,
    epoch: int,
    *,
    position: int,
    start: MidEpoch | None = None,
    stop: StopFlag | None = None,
    progress=None,
    on_sync: Callable[[int, float, bool], int | None] | None = None,
) -> EpochStats:
    """One pass over loader (which already skips start.samples); task.inputs(batch, epoch) makes
    each batch's inputs and labels on the device. position: samples seen before.

    on_sync(samples into the epoch, seconds, last) runs on every rank at every sync point, where
    the device has caught up (a time budget measures there), last=True at the epoch's end; it
    may return where the epoch ends.
    """
    cfg = config.train
    parts.model.train()
    n_batches, accum = len(loader), cfg.grad_accum
    earlier = start.totals if start else EpochTotals()
    in_epoch, images, optimizer_steps, window_samples = (start.samples if start else 0), 0, 0, 0
    sums, stopped, end = DeviceSums(dist.device), False, math.inf
    # every rank must agree on the sync points, so a due log line counts on all of them; a
    # progress bar (rank 0 on a terminal) only changes how the line is shown
    clock = _Clock(epoch, n_batches, cfg.log_every, progress)
    for k, batch in enumerate(loader):
        clock.fetched()
        inputs, labels = task.inputs(batch, epoch)
        window = min(accum, n_batches - k // accum * accum)  # the epoch's last window may be short
        closes_window = (k + 1) % accum == 0 or k + 1 == n_batches
        sync_grads = contextlib.nullcontext() if closes_window or not dist.is_distributed else parts.model.no_sync()
        with sync_grads:
            loss, correct = forward_backward(parts, inputs, labels, cfg.amp, window)
        sums.add(loss, correct, len(labels))
        n = len(labels) * dist.world_size  # host arithmetic: the shape is known without the device
        images, in_epoch, window_samples = images + len(labels), in_epoch + n, window_samples + n
        if closes_window:
            update(parts, position, window_samples, cfg.clip_grad)
            position, window_samples, optimizer_steps = position + window_samples, 0, optimizer_steps + 1
            # A sync point every sync_every optimizer steps, and when a log line is due (it reads the device)
            if optimizer_steps % cfg.sync_every == 0 or clock.log_due(k + 1):
                loss_sum, _, non_finite, stopped = sums.reduced(dist, stop is not None and stop.requested)
                if non_finite:
                    raise NonFiniteLossError(
                        f"non-finite loss in epoch {epoch + 1} by step {k + 1}; last.pt keeps the last good checkpoint"
                    )
                if clock.log_due(k + 1):
                    clock.log(
                        k + 1,
                        loss_sum / max(images * dist.world_size, 1),
                        parts.schedule.lr,
                        images * dist.world_size,
                        dist,
                    )
                if on_sync is not None:
                    end = on_sync(in_epoch, clock.elapsed(), False) or end
            if stopped or in_epoch >= end:
                break
        if progress is not None:
            progress.update(1)
        clock.step_done()
    loss_sum, correct, non_finite, _ = sums.reduced(dist)
    if non_finite:
        raise NonFiniteLossError(f"non-finite loss in epoch {epoch + 1}; last.pt keeps the last good checkpoint")
    if on_sync is not None and not stopped:
        on_sync(in_epoch, clock.elapsed(), True)
    session = EpochTotals(loss_sum, correct, images * dist.world_size)
    return EpochStats(
        earlier + session, images * dist.world_size, clock.elapsed(), position, in_epoch if stopped else None
    )


def forward_backward(
    parts: StepParts, inputs: torch.Tensor, labels: torch.Tensor, amp: str, window: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss module's forward under autocast, the scaled backward (the loss over the window of
    micro-batches one optimizer step takes); the loss and correct predictions, still on the device."""
    with autocast(inputs.device, amp):  # forward only: backward runs outside autocast
        loss, correct = parts.model(inputs, labels)
    parts.scaler.scale(loss / window).backward()
    return loss.detach(), correct.detach()


def update(parts: StepParts, position: int, samples: int, clip_grad: float | None) -> None:
    """One optimizer step after `position` samples, over `samples` more: the LR, the (clipped,
    unscaled) step, the EMA."""
    parts.schedule.step(position, samples)
    optimizer_step(parts.optimizer, parts.scaler, clip_grad)
    if parts.ema is not None:
        parts.ema.update(position + samples)


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, clip_grad: float | None) -> None:
    if clip_grad:
        scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


class _Clock:
    """Step timing and the periodic log line (ETA, images/s, data share, GPU memory)."""

    def __init__(self, epoch: int, steps: int, log_every: int, progress=None):
        self.epoch, self.steps, self.log_every, self.progress = epoch, steps, log_every, progress
        self.start = self.last = time.perf_counter()
        self.data_s, self.logged_at = 0.0, 0

    def fetched(self) -> None:
        self.data_s += time.perf_counter() - self.last

    def step_done(self) -> None:
        self.last = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def log_due(self, step: int) -> bool:
        return bool(self.log_every) and step - self.logged_at >= self.log_every

    def log(self, step: int, loss: float, lr: float, images: int, dist: DistInfo) -> None:
        self.logged_at = step
        elapsed = self.elapsed()
        if self.progress is not None:  # the bar shows ETA and rate itself
            self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            return
        eta = elapsed / step * (self.steps - step)
        mem = f" mem {torch.cuda.max_memory_allocated() / 2**30:.1f}G" if dist.device.type == "cuda" else ""
        log.info(
            "epoch %d [%d/%d] loss %.4f lr %.2e %.0f img/s data %.0f%% eta %s%s",
            self.epoch + 1,
            step,
            self.steps,
            loss,
            lr,
            images / max(elapsed, 1e-9),
            100 * self.data_s / max(elapsed, 1e-9),
            time.strftime("%H:%M:%S", time.gmtime(eta)),
            mem,
        )
