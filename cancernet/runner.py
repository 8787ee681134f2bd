"""Wires config, data, model, engine, checkpoints and tracking into one training run."""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from . import checkpoint
from .atomic import write_text
from .config import Config, resolved_yaml
from .data.loaders import SplitLoader, load_table, make_loader, set_epoch
from .distributed import DistInfo, all_reduce_sum, barrier
from .engine import StopFlag, evaluate, train_one_epoch
from .evaluation import evaluate_checkpoint
from .metrics import roc_auc
from .models import build_model, count_parameters
from .optim import build_optimizer, build_scheduler
from .tracking import NullTracker, start_tracker

log = logging.getLogger(__name__)
SUMMARY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "lr",
                   "epoch_s", "images_per_s"]


@dataclass
class Training:
    """Everything one run trains with; `state` is what a checkpoint adds to the weights."""

    cfg: Config
    dist: DistInfo
    out_dir: Path
    table: pd.DataFrame
    loaders: dict[str, SplitLoader]
    model: torch.nn.Module  # what the loop calls: compiled and/or DDP-wrapped
    model_without_ddp: torch.nn.Module  # what checkpoints and evaluation use
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    state: dict = field(default_factory=lambda: {
        "epoch": 0, "best_auc": -math.inf, "best_val_loss": math.inf, "history": [],
        "mid_epoch": None, "wandb_id": None})

    def save(self, name: str) -> None:
        checkpoint.save(self.out_dir / "checkpoints" / name, {
            "model": self.model_without_ddp.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": checkpoint.rng_state(), "config": self.cfg.to_dict(), **self.state})

    def restore(self, path: Path) -> None:
        saved = checkpoint.load(path)
        checkpoint.load_model_state(self.model_without_ddp, saved, path)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        checkpoint.set_rng_state(saved["rng"])
        self.state.update({k: saved[k] for k in self.state})
        mid = self.state["mid_epoch"]
        log.info("resumed from %s at epoch %d%s", path, self.state["epoch"], f" step {mid['step']}" if mid else "")


def build(cfg: Config, dist: DistInfo) -> Training:
    out_dir = Path(cfg.train.out_dir)
    torch.manual_seed(cfg.train.seed)
    if dist.is_main:
        write_text(out_dir / "config.yaml", resolved_yaml(cfg, dist.world_size))
    table = load_table(cfg, dist, out_dir)
    loaders = {s: make_loader(cfg, dist, table[table["split"] == s], s == "train")
               for s in ("train", "val", "test")}
    log.info("images: %s", {str(k): int(v) for k, v in table["split"].value_counts().items()})
    model_without_ddp = build_model(cfg.model).to(dist.device)
    trainable, total = count_parameters(model_without_ddp)
    log.info("model %s: %d trainable of %d parameters", cfg.model.arch, trainable, total)
    # Compile before the DDP wrap; checkpoints always use model_without_ddp (clean keys).
    model = torch.compile(model_without_ddp) if cfg.model.compile else model_without_ddp
    if dist.is_distributed:
        model = DDP(model, device_ids=[dist.device] if dist.device.type == "cuda" else None)
    if dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    optimizer = build_optimizer(cfg.optim, model_without_ddp)
    steps_per_epoch = len(loaders["train"].loader) // cfg.train.grad_accum
    scheduler = build_scheduler(cfg.optim, optimizer, steps_per_epoch, cfg.train.epochs)
    scaler = torch.amp.GradScaler(dist.device.type,
                                  enabled=cfg.train.amp == "fp16" and dist.device.type == "cuda")
    return Training(cfg, dist, out_dir, table, loaders, model, model_without_ddp, optimizer,
                    scheduler, scaler)


def run(cfg: Config, dist: DistInfo, stop: StopFlag | None = None) -> str:
    """Train, validate each epoch, test the best checkpoint. Returns 'done' or 'stopped'.

    stop: set it (signals do) to end the run at the next step boundary with a checkpoint.
    """
    t = build(cfg, dist)
    resume_from = checkpoint.resume_path(cfg.train.resume, t.out_dir)
    if resume_from is not None:
        t.restore(resume_from)
        if dist.is_main:  # summary.csv always matches the checkpoint it came with
            write_summary(t.out_dir, t.state["history"])
    tracker = start_tracker(cfg, dist, t.out_dir, t.state["wandb_id"])
    t.state["wandb_id"] = tracker.run_id  # a resumed or requeued job continues the same W&B run
    stop = stop or StopFlag()
    try:
        with stop_on_signals(stop):
            for epoch in range(t.state["epoch"], cfg.train.epochs):
                if not train_epoch(t, epoch, stop, tracker):
                    return "stopped"
        barrier(dist)  # best.pt is complete before every rank reads it
        best = t.out_dir / "checkpoints" / "best.pt"
        evaluate_checkpoint(cfg, dist, t.model_without_ddp, t.loaders, t.out_dir, best, t.table, "test", tracker)
        tracker.log_model(best, {"best_val_auc": t.state["best_auc"], "epoch": t.state["epoch"]})
        return "done"
    finally:
        tracker.finish()


def train_epoch(t: Training, epoch: int, stop: StopFlag, tracker: NullTracker) -> bool:
    """Train and validate one epoch, checkpoint on rank 0. False when the run must stop now."""
    cfg, dist, mid = t.cfg, t.dist, t.state["mid_epoch"]
    set_epoch(t.loaders["train"], epoch, mid["step"] if mid else 0)
    bar = progress_bar(cfg, dist, len(t.loaders["train"].loader), f"epoch {epoch + 1}")
    resume = {"step": mid["step"], "totals": mid["totals"] if dist.is_main else [0.0] * 4} if mid else None
    stats = train_one_epoch(t.model, t.loaders["train"].loader, t.optimizer, t.scheduler, t.scaler, cfg,
                            dist, epoch, t.loaders["train"].device_augment, stop, bar, resume)
    if bar is not None:
        bar.close()
    if stats["stopped_at_step"] is not None:
        t.state.update(epoch=epoch, mid_epoch={"step": stats["stopped_at_step"], "totals": stats["totals"]})
        if dist.is_main:
            t.save("last.pt")
            log.warning("stopped in epoch %d at step %d; checkpoint saved, a resume continues there",
                        epoch + 1, stats["stopped_at_step"])
        return False
    val = evaluate(t.model_without_ddp, t.loaders["val"].loader, dist, cfg.train.amp,
                   t.loaders["val"].device_augment)
    t.state.update(epoch=epoch + 1, mid_epoch=None)
    if dist.is_main:
        row = epoch_row(epoch, stats, val, t.optimizer.param_groups[0]["lr"])
        t.state["history"].append(row)
        # Best by val AUC; ties (common once AUC saturates) go to the lower val loss.
        is_best = (row["val_auc"], -row["val_loss"]) > (t.state["best_auc"], -t.state["best_val_loss"])
        if is_best:
            t.state.update(best_auc=row["val_auc"], best_val_loss=row["val_loss"])
        t.save("last.pt")
        if is_best:
            t.save("best.pt")
        write_summary(t.out_dir, t.state["history"])
        tracker.log_epoch(row)
        log.info("epoch %d/%d train_loss %.4f train_acc %.4f val_loss %.4f val_acc %.4f val_auc %.4f%s "
                 "%.0f img/s %.1fs", epoch + 1, cfg.train.epochs, row["train_loss"], row["train_acc"],
                 row["val_loss"], row["val_acc"], row["val_auc"], " (best)" if is_best else "",
                 row["images_per_s"], row["epoch_s"])
    if _any_rank(stop.requested, dist):
        log.warning("stop requested: stopping after epoch %d, checkpoint saved", epoch + 1)
        return False
    return True


def _any_rank(flag: bool, dist: DistInfo) -> bool:
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=dist.device), dist).item() > 0)


def epoch_row(epoch: int, stats: dict, val: dict, lr: float) -> dict:
    return {"epoch": epoch + 1, "train_loss": stats["train_loss"], "train_acc": stats["train_acc"],
            "val_loss": float(val["loss"].mean()), "val_acc": float(((val["prob"] >= 0.5) == val["label"]).mean()),
            "val_auc": roc_auc(val["label"], val["prob"]), "lr": lr, "epoch_s": stats["epoch_s"],
            "images_per_s": stats["images"] / max(stats["epoch_s"], 1e-9)}


def write_summary(out_dir: Path, history: list[dict]) -> None:
    write_text(out_dir / "summary.csv", pd.DataFrame(history, columns=SUMMARY_COLUMNS).to_csv(index=False))


def progress_bar(cfg: Config, dist: DistInfo, total: int, desc: str):
    """tqdm on rank 0 when stderr is a terminal (not in Slurm logs), unless train.progress says."""
    show = {"on": True, "off": False, "auto": sys.stderr.isatty()}[cfg.train.progress]
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True) if show and dist.is_main else None


@contextlib.contextmanager
def stop_on_signals(stop: StopFlag):
    """USR1 (Slurm's warning before the time limit) and TERM (preemption) only set a flag."""
    def handler(signum, frame):
        log.warning("received signal %d: stopping at the next step boundary", signum)
        stop.requested = True
    previous = {s: signal.signal(s, handler) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
