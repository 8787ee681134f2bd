"""train_one_epoch and evaluate: pure loops over loaders (no file I/O)."""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import Config
from .data.datasets import sample_seed
from .errors import UserError
from .distributed import DistInfo, all_reduce_sum, gather_rows

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError, RuntimeError):
    """Raised on every rank together when any rank saw a NaN/inf loss."""


@dataclass
class StopFlag:
    """Set from a signal handler; the loop checks it (on all ranks together) at step boundaries."""

    requested: bool = False


def autocast(device: torch.device, amp: str):
    """Mixed precision on CUDA; a no-op on CPU, where bf16 autocast is rarely faster."""
    if device.type != "cuda" or amp == "off":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _to_device(images, labels, dist: DistInfo, augment, generator_seed: int):
    images = images.to(dist.device, non_blocking=True)
    labels = labels.to(dist.device, non_blocking=True)
    if augment is not None:  # packed path: uint8 batch, augmented on the training device
        gen = torch.Generator(dist.device).manual_seed(generator_seed)
        images = augment(images, gen)
    return images, labels


def train_one_epoch(model: nn.Module, loader, optimizer, scheduler, scaler, cfg: Config,
                    dist: DistInfo, epoch: int, augment=None, stop: StopFlag | None = None,
                    progress=None, resume: dict | None = None) -> dict:
    """One pass over loader. Returns epoch stats; 'stopped_at_step' is set when stopped early.

    resume: {'step', 'totals'} of a mid-epoch checkpoint (totals: all ranks' sums, passed to one
    rank only); the loader must already skip those steps.
    """
    model.train()
    accum, tc = cfg.train.grad_accum, cfg.train
    step = resume["step"] if resume else 0
    # loss sum, correct, seen, non-finite losses: summed on device, read only at sync points
    totals = torch.zeros(4, dtype=torch.float64, device=dist.device)
    if resume:
        totals += torch.tensor(resume["totals"], dtype=torch.float64, device=dist.device)
    start, fetched, data_s, stopped = time.perf_counter(), time.perf_counter(), 0.0, False
    for images, labels, _ in loader:
        data_s += time.perf_counter() - fetched
        images, labels = _to_device(images, labels, dist, augment,
                                    sample_seed(tc.seed, epoch, step, dist.rank))
        boundary = (step + 1) % accum == 0
        no_sync = model.no_sync() if dist.is_distributed and not boundary else contextlib.nullcontext()
        with no_sync:
            with autocast(dist.device, tc.amp):  # forward only: backward runs outside autocast
                logits = model(images).float()
                loss = F.cross_entropy(logits, labels)
            scaler.scale(loss / accum).backward()
        if boundary:
            _optimizer_step(model, optimizer, scheduler, scaler, tc.clip_grad)
        step += 1
        totals += torch.stack([loss.detach() * len(labels), (logits.argmax(1) == labels).sum(),
                               torch.tensor(len(labels), device=dist.device), ~torch.isfinite(loss.detach())]).double()
        if boundary and (step // accum) % tc.sync_every == 0:
            flags = all_reduce_sum(torch.stack([totals[3], torch.tensor(
                float(stop is not None and stop.requested), dtype=torch.float64, device=dist.device)]), dist)
            if flags[0] > 0:
                raise NonFiniteLossError(f"non-finite loss in epoch {epoch + 1} by step {step}; last.pt keeps "
                                         "the last good epoch")
            if flags[1] > 0:
                stopped = True
                break
        if progress is not None:
            progress.update(1)
        if progress is None and tc.log_every and step % tc.log_every == 0:
            _log_step(epoch, step, len(loader), loss, optimizer, start, data_s, totals, dist)
        fetched = time.perf_counter()
    totals = all_reduce_sum(totals, dist)
    if totals[3] > 0:
        raise NonFiniteLossError(f"non-finite loss in epoch {epoch + 1}; last.pt keeps the last good epoch")
    seconds = time.perf_counter() - start
    seen = max(totals[2].item(), 1)
    return {"train_loss": totals[0].item() / seen, "train_acc": totals[1].item() / seen,
            "images": int(totals[2].item()), "epoch_s": seconds, "data_s": data_s,
            "stopped_at_step": step if stopped else None, "totals": totals.tolist()}


def _optimizer_step(model, optimizer, scheduler, scaler, clip_grad: float | None) -> None:
    if clip_grad:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


def _log_step(epoch, step, steps, loss, optimizer, start, data_s, totals, dist) -> None:
    elapsed = time.perf_counter() - start
    rate = totals[2].item() * dist.world_size / max(elapsed, 1e-9)
    eta = elapsed / step * (steps - step) if step else 0.0
    mem = f" mem {torch.cuda.max_memory_allocated() / 2**30:.1f}G" if dist.device.type == "cuda" else ""
    log.info("epoch %d [%d/%d] loss %.4f lr %.2e %.0f img/s data %.0f%% eta %s%s", epoch, step, steps,
             loss.item(), optimizer.param_groups[0]["lr"], rate, 100 * data_s / max(elapsed, 1e-9),
             time.strftime("%H:%M:%S", time.gmtime(eta)), mem)


def dihedral_views(images: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/quarter turns of a square NCHW batch (test-time augmentation)."""
    turns = [torch.rot90(images, k, dims=(-2, -1)) for k in range(4)]
    return turns + [t.flip(-1) for t in turns]


def predict_proba(model: nn.Module, images: torch.Tensor, amp: str = "off", tta: bool = False) -> torch.Tensor:
    """(N, 2) class probabilities; with tta, averaged over the 8 dihedral views."""
    views = dihedral_views(images) if tta else [images]
    with autocast(images.device, amp):
        return torch.stack([model(v).float().softmax(1) for v in views]).mean(0)


@torch.no_grad()
def evaluate(model: nn.Module, loader, dist: DistInfo, amp: str = "off", augment=None,
             progress=None, tta: bool = False) -> dict[str, np.ndarray]:
    """Predict every sample of a sharded loader; every rank gets all rows, sorted by index.

    Pass the unwrapped model: DDP's forward would start collectives that uneven shards break.
    """
    model.eval()
    rows = []
    for images, labels, index in loader:
        images, labels = _to_device(images, labels, dist, augment, 0)
        probs = predict_proba(model, images, amp, tta)
        loss = F.nll_loss(probs.clamp_min(1e-7).log(), labels.clamp(min=0), reduction="none")
        prob = probs[:, 1]
        rows.append(torch.stack([index.to(dist.device).double(), labels.double(), prob.double(),
                                 loss.double()], 1))
        if progress is not None:
            progress.update(1)
    local = torch.cat(rows) if rows else torch.zeros(0, 4, dtype=torch.float64, device=dist.device)
    table = gather_rows(local, dist).cpu().numpy()
    table = table[np.argsort(table[:, 0], kind="stable")]
    return {"index": table[:, 0].astype(np.int64), "label": table[:, 1].astype(np.int64),
            "prob": table[:, 2], "loss": table[:, 3]}
