"""Wires config, data, model, engine and checkpoints into one training run."""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from . import checkpoint, report
from .atomic import write_text
from .config import Config, resolved_yaml
from .data.loaders import load_table, make_loader, set_epoch
from .distributed import DistInfo, all_reduce_sum, barrier
from .engine import StopFlag, evaluate, train_one_epoch
from .metrics import log_loss, roc_auc
from .models import build_model, count_parameters
from .optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)
SUMMARY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "lr",
                   "epoch_s", "images_per_s"]


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


def run(cfg: Config, dist: DistInfo, stop: StopFlag | None = None) -> str:
    """Train, validate each epoch, test the best checkpoint. Returns 'done' or 'stopped'.

    stop: set it (signals do) to end the run at the next step boundary with a checkpoint.
    """
    out_dir = Path(cfg.train.out_dir)
    torch.manual_seed(cfg.train.seed)
    if dist.is_main:
        write_text(out_dir / "config.yaml", resolved_yaml(cfg, dist.world_size))
    table = load_table(cfg, dist, out_dir)
    loaders = {s: make_loader(cfg, dist, table[table["split"] == s], s == "train")
               for s in ("train", "val", "test")}
    log.info("images: %s", table["split"].value_counts().to_dict())

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

    state = {"epoch": 0, "best_auc": -math.inf, "best_val_loss": math.inf, "history": [],
             "mid_epoch": None, "wandb_id": None}
    resume_from = checkpoint.resume_path(cfg.train.resume, out_dir)
    if resume_from is not None:
        saved = checkpoint.load(resume_from)
        checkpoint.load_model_state(model_without_ddp, saved, resume_from)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        checkpoint.set_rng_state(saved["rng"])
        state.update({k: saved[k] for k in state})
        log.info("resumed from %s at epoch %d%s", resume_from, state["epoch"],
                 f" step {state['mid_epoch']['step']}" if state["mid_epoch"] else "")
        if dist.is_main:  # summary.csv always matches the checkpoint it came with
            write_summary(out_dir, state["history"])

    def save(name: str) -> None:
        checkpoint.save(out_dir / "checkpoints" / name, {
            "model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "rng": checkpoint.rng_state(), "config": cfg.to_dict(), **state})

    stop = stop or StopFlag()
    with stop_on_signals(stop):
        for epoch in range(state["epoch"], cfg.train.epochs):
            mid = state["mid_epoch"]
            set_epoch(loaders["train"], epoch, mid["step"] if mid else 0)
            bar = progress_bar(cfg, dist, len(loaders["train"].loader), f"epoch {epoch}")
            stats = train_one_epoch(model, loaders["train"].loader, optimizer, scheduler, scaler, cfg,
                                    dist, epoch, loaders["train"].device_augment, stop, bar,
                                    resume={"step": mid["step"], "totals": mid["totals"] if dist.is_main
                                            else [0.0] * 4} if mid else None)
            if bar is not None:
                bar.close()
            if stats["stopped_at_step"] is not None:
                state.update(epoch=epoch, mid_epoch={"step": stats["stopped_at_step"], "totals": stats["totals"]})
                if dist.is_main:
                    save("last.pt")
                    log.warning("stopped in epoch %d at step %d; checkpoint saved, resume continues there",
                                epoch, stats["stopped_at_step"])
                return "stopped"
            val = evaluate(model_without_ddp, loaders["val"].loader, dist, cfg.train.amp,
                           loaders["val"].device_augment)
            state.update(epoch=epoch + 1, mid_epoch=None)
            if dist.is_main:
                row = epoch_row(epoch, stats, val, optimizer.param_groups[0]["lr"])
                state["history"].append(row)
                # Best by val AUC; ties (common once AUC saturates) go to the lower val loss.
                is_best = (row["val_auc"], -row["val_loss"]) > (state["best_auc"], -state["best_val_loss"])
                if is_best:
                    state.update(best_auc=row["val_auc"], best_val_loss=row["val_loss"])
                save("last.pt")
                if is_best:
                    save("best.pt")
                write_summary(out_dir, state["history"])
                log.info("epoch %d/%d train_loss %.4f train_acc %.4f val_loss %.4f val_acc %.4f "
                         "val_auc %.4f%s %.0f img/s %.1fs", epoch + 1, cfg.train.epochs, row["train_loss"],
                         row["train_acc"], row["val_loss"], row["val_acc"], row["val_auc"],
                         " (best)" if is_best else "", row["images_per_s"], row["epoch_s"])
            if _any_rank(stop.requested, dist):
                return "stopped"
    barrier(dist)  # best.pt is complete before every rank reads it
    test_best(cfg, dist, model_without_ddp, loaders, out_dir)
    return "done"


def _any_rank(flag: bool, dist: DistInfo) -> bool:
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=dist.device), dist).item() > 0)


def epoch_row(epoch: int, stats: dict, val: dict, lr: float) -> dict:
    return {"epoch": epoch + 1, "train_loss": stats["train_loss"], "train_acc": stats["train_acc"],
            "val_loss": float(val["loss"].mean()), "val_acc": float(((val["prob"] >= 0.5) == val["label"]).mean()),
            "val_auc": roc_auc(val["label"], val["prob"]), "lr": lr, "epoch_s": stats["epoch_s"],
            "images_per_s": stats["images"] / max(stats["epoch_s"], 1e-9)}


def write_summary(out_dir: Path, history: list[dict]) -> None:
    write_text(out_dir / "summary.csv", pd.DataFrame(history, columns=SUMMARY_COLUMNS).to_csv(index=False))


def test_best(cfg: Config, dist: DistInfo, model, loaders: dict, out_dir: Path) -> None:
    """Every rank predicts its shard of val and test with best.pt; rank 0 writes the report."""
    best = out_dir / "checkpoints" / "best.pt"
    checkpoint.load_model_state(model, checkpoint.load(best), best)
    start = time.perf_counter()
    frames = {}
    for split in ("val", "test"):
        result = evaluate(model, loaders[split].loader, dist, cfg.train.amp, loaders[split].device_augment)
        frames[split] = report.predictions_frame(loaders[split].ids, result)
    if dist.is_main:
        for split, frame in frames.items():
            report.write_predictions(out_dir / "predictions" / f"{split}.csv", frame)
        metrics = report.write_metrics(out_dir, frames["test"])
        log.info("test (best checkpoint, n=%d, %.1fs): accuracy %.4f roc_auc %.4f loss %.4f",
                 metrics["n"], time.perf_counter() - start, metrics["accuracy"], metrics["roc_auc"],
                 log_loss(frames["test"]["label"].to_numpy(), frames["test"]["prob"].to_numpy()))
