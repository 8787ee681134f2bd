"""Wires config, data, model, engine, checkpoints and tracking into one training run."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from . import checkpoint
from .atomic import write_text
from .config import Config, resolved_yaml
from .data.augment import sample_seed
from .data.loaders import SplitLoader, check_validation_split, load_table, make_loader, set_epoch
from .distributed import DistInfo, barrier, broadcast_buffers
from .ema import ModelEma
from .engine import EpochStats, EpochTotals, MidEpoch, StepParts, StopFlag, evaluate, train_one_epoch
from .errors import ConfigError, UserError
from .evaluation import evaluate_run
from .metrics import roc_auc
from .models import build_model, count_parameters
from .optim import LrSchedule, build_optimizer, describe_groups, effective_lr, load_optimizer_state
from .rundir import RunDir
from .tracking import NullTracker, start_tracker

log = logging.getLogger(__name__)


@dataclass
class EpochRow:
    """One line of summary.csv."""

    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    val_auc: float
    lr: float
    samples_seen: int
    epoch_s: float
    images_per_s: float
    val_s: float
    ckpt_s: float


SUMMARY_COLUMNS = [f.name for f in dataclasses.fields(EpochRow)]


@dataclass
class RunState:
    """What a checkpoint adds to the weights and optimizer: where the run is and what it found."""

    epoch: int = 0  # completed epochs
    position: int = 0  # training samples seen since the run began (all ranks)
    best_auc: float = -math.inf
    best_val_loss: float = math.inf
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    mid_epoch: dict | None = None  # MidEpoch of a run stopped inside an epoch
    wandb_id: str | None = None
    train_s: float = 0.0  # wall time in training epochs, over all sessions


@dataclass
class Training:
    """Everything one run trains with."""

    cfg: Config
    dist: DistInfo
    run: RunDir
    table: pd.DataFrame
    loaders: dict[str, SplitLoader]
    model_without_ddp: torch.nn.Module  # what checkpoints and evaluation use
    parts: StepParts
    state: RunState = field(default_factory=RunState)
    writer: checkpoint.CheckpointWriter = field(default_factory=checkpoint.CheckpointWriter)

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights validation, best.pt and the test report use: the EMA when it is on."""
        return self.parts.ema.module if self.parts.ema is not None else self.model_without_ddp

    def resume_state(self, rng: list) -> dict:
        p = self.parts
        return {"model": self.model_without_ddp.state_dict(), "optimizer": p.optimizer.state_dict(),
                "scheduler": p.schedule.state_dict(), "scaler": p.scaler.state_dict(), "rng": rng,
                "config": self.cfg.to_dict(), "world_size": self.dist.world_size,
                **({"ema": p.ema.state_dict()} if p.ema is not None else {}), **dataclasses.asdict(self.state)}

    def best_state(self) -> dict:
        return {"model": self.eval_model.state_dict(), "config": self.cfg.to_dict(), "epoch": self.state.epoch,
                "best_auc": self.state.best_auc, "best_val_loss": self.state.best_val_loss,
                "weights": "ema" if self.parts.ema is not None else "model"}


def prepare_run_dir(cfg: Config, dist: DistInfo, run: RunDir):
    """The checkpoint to resume from (or None); a fresh run never mixes with an earlier one."""
    resume_from = checkpoint.resume_path(cfg.train.resume, run.last)
    if resume_from is None and run.holds_a_run():
        if cfg.train.resume == "none" and not cfg.train.overwrite:
            raise UserError(f"train.out_dir {run.root} already holds a run: continue it with train.resume=auto, "
                            "choose a new train.out_dir, or replace it with train.overwrite=true")
        barrier(dist)  # every rank has looked before rank 0 removes anything
        if dist.is_main:
            log.warning("%s holds a run without a checkpoint to resume: replacing its files", run.root)
            run.clear()
    barrier(dist)
    return resume_from


def build(cfg: Config, dist: DistInfo, run: RunDir, saved_splits: pd.DataFrame | None = None) -> Training:
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    table, bad = load_table(cfg, dist, saved_splits)
    check_validation_split(table)
    if dist.is_main:
        write_text(run.splits, table[["id", "split"]].to_csv(index=False))
        if bad:
            write_text(run.bad_images, pd.DataFrame(bad.items(), columns=["id", "reason"]).to_csv(index=False))
    loaders = {s: make_loader(cfg, dist, table[table["split"] == s], s == "train") for s in ("train", "val", "test")}
    log.info("images: %s", {str(k): int(v) for k, v in table["split"].value_counts().items()})
    model_without_ddp = build_model(cfg.model, cfg.data.image_size)
    if cfg.model.sync_bn and dist.is_distributed:
        if dist.device.type != "cuda":
            raise ConfigError("config key 'model.sync_bn': SyncBatchNorm needs CUDA devices; set it false on CPU")
        model_without_ddp = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model_without_ddp)
    model_without_ddp = model_without_ddp.to(dist.device)
    trainable, total = count_parameters(model_without_ddp)
    log.info("model %s: %d trainable of %d parameters", cfg.model.arch, trainable, total)
    ema = ModelEma(model_without_ddp, cfg.train.ema_decay) if cfg.train.ema_decay else None
    # Compile before the DDP wrap; checkpoints always use model_without_ddp (clean keys).
    model = torch.compile(model_without_ddp) if cfg.model.compile else model_without_ddp
    if dist.is_distributed:
        model = DDP(model, device_ids=[dist.device] if dist.device.type == "cuda" else None)
    if dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(sample_seed(cfg.train.seed, dist.rank))  # each rank its own dropout masks
    optimizer = build_optimizer(cfg.optim, model_without_ddp, dist.device)
    sampler = loaders["train"].sampler
    global_batch = sampler.global_batch * cfg.train.grad_accum
    base_lr = effective_lr(cfg.optim, global_batch)
    per_epoch = sampler.samples_per_epoch()
    schedule = LrSchedule(optimizer, cfg.optim, base_lr, per_epoch * cfg.train.epochs,
                          int(cfg.optim.warmup_epochs * per_epoch))
    log.info("optimizer %s, global batch %d, lr %.3g%s; %s", cfg.optim.name, global_batch, base_lr,
             f" (optim.lr {cfg.optim.lr:g} scaled linearly from batch {cfg.optim.base_batch})"
             if cfg.optim.lr_scale == "linear" else "", describe_groups(optimizer, base_lr))
    scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.train.amp == "fp16")
    parts = StepParts(model, optimizer, schedule, scaler, ema, cfg.train.clip_grad, cfg.optim.label_smoothing)
    return Training(cfg, dist, run, table, loaders, model_without_ddp, parts)


def restore(t: Training, path) -> None:
    """Continue from a checkpoint: weights, optimizer moments, EMA, RNG and position; the schedule
    follows the current config from the position reached."""
    saved = checkpoint.load(path)
    checkpoint.check_resumable(saved["config"], t.cfg.to_dict(), path)
    checkpoint.load_model_state(t.model_without_ddp, saved, path)
    if "optimizer" not in saved:
        raise UserError(f"checkpoint {path} holds weights only (a best.pt); resume from last.pt, "
                        "or start a new run from these weights with model.pretrained")
    load_optimizer_state(t.parts.optimizer, saved["optimizer"], path)
    if saved["scaler"] and t.parts.scaler.is_enabled():
        t.parts.scaler.load_state_dict(saved["scaler"])
    if t.parts.ema is not None:
        if "ema" in saved:
            t.parts.ema.load_state_dict(saved["ema"])
        else:
            t.parts.ema = ModelEma(t.model_without_ddp, t.cfg.train.ema_decay)
            log.warning("the checkpoint has no EMA: the EMA starts from its weights")
    if not checkpoint.set_rng_state(saved["rng"] if isinstance(saved["rng"], list) else [], t.dist):
        torch.manual_seed(sample_seed(t.cfg.train.seed, t.dist.rank, saved["epoch"]))
        log.warning("no saved RNG state for rank %d (world size changed): it draws from a new seed", t.dist.rank)
    names = {f.name for f in dataclasses.fields(RunState)}
    t.state = RunState(**{k: v for k, v in saved.items() if k in names})
    mid = t.state.mid_epoch
    if mid and "step" in mid:  # written by cancernet before positions were counted in samples
        old = saved["config"]["train"]
        samples = mid["step"] * old["batch_size"] * saved.get("world_size", 1)
        loss_sum, correct, seen, _ = mid["totals"]
        t.state.mid_epoch = {"samples": samples, "totals": {"loss_sum": loss_sum, "correct": correct, "seen": int(seen)}}
    if "position" not in saved:
        t.state.position = t.state.epoch * t.loaders["train"].sampler.samples_per_epoch() + (
            t.state.mid_epoch["samples"] if t.state.mid_epoch else 0)
    changes = checkpoint.changed_settings(saved["config"], t.cfg.to_dict())
    if saved.get("world_size", t.dist.world_size) != t.dist.world_size:
        changes.append(f"world size: {saved['world_size']} -> {t.dist.world_size}")
    mid = t.state.mid_epoch
    schedule = t.parts.schedule
    log.info("resumed from %s after epoch %d%s: sample %d of %d, lr %.3g%s", path, t.state.epoch,
             f" (+{mid['samples']} samples into epoch {t.state.epoch + 1})" if mid else "", t.state.position,
             schedule.total, schedule.base_lr * schedule.factor(t.state.position),
             f"; schedule rebuilt for what changed: {', '.join(changes)}" if changes else "")


def run(cfg: Config, dist: DistInfo, stop: StopFlag | None = None) -> str:
    """Train, validate each epoch, test the best checkpoint. Returns 'done' or 'stopped'.

    stop: set it (signals do) to end the run at the next sync point with a checkpoint.
    """
    run_dir = RunDir(cfg.train.out_dir)
    resume_from = prepare_run_dir(cfg, dist, run_dir)
    saved_splits = (pd.read_csv(run_dir.splits, dtype={"id": str})
                    if resume_from is not None and run_dir.splits.is_file() else None)
    t = build(cfg, dist, run_dir, saved_splits)
    if resume_from is not None:
        restore(t, resume_from)
    if dist.is_main:  # written once the checks passed; summary.csv matches the checkpoint
        write_text(run_dir.config, resolved_yaml(cfg, dist.world_size,
                                                 {"resumed_from": str(resume_from)} if resume_from else None))
        write_summary(run_dir, t.state.history)
    tracker = start_tracker(cfg, dist, run_dir.root, t.state.wandb_id)
    t.state.wandb_id = tracker.run_id  # a resumed or requeued job continues the same W&B run
    stop = stop or StopFlag()
    try:
        with stop_on_signals(stop):
            for epoch in range(t.state.epoch, cfg.train.epochs):
                if not train_epoch(t, epoch, stop, tracker):
                    return "stopped"
        t.writer.wait()
        barrier(dist)  # best.pt is complete before every rank reads it
        evaluate_run(cfg, dist, t.model_without_ddp, t.loaders, run_dir, t.table, tracker,
                     {"best_epoch": t.state.best_epoch, "train_s": t.state.train_s})
        if cfg.wandb.log_model:
            tracker.log_model(run_dir.best, {"best_val_auc": t.state.best_auc, "epoch": t.state.best_epoch})
        return "done"
    finally:
        t.writer.wait()
        tracker.finish()


def train_epoch(t: Training, epoch: int, stop: StopFlag, tracker: NullTracker) -> bool:
    """Train (and validate) one epoch, checkpoint on rank 0. False when the run must stop now."""
    cfg, dist = t.cfg, t.dist
    mid = MidEpoch(t.state.mid_epoch["samples"], EpochTotals(**t.state.mid_epoch["totals"])) if t.state.mid_epoch else None
    train = t.loaders["train"]
    set_epoch(train, epoch, mid.samples if mid else 0)
    bar = progress_bar(cfg, dist, len(train.loader), f"epoch {epoch + 1}")
    stats = train_one_epoch(t.parts, train.loader, train.augment, cfg.train, dist, epoch, position=t.state.position,
                            start=mid, stop=stop, progress=bar)
    if bar is not None:
        bar.close()
    t.state.position, t.state.train_s = stats.position, t.state.train_s + stats.seconds
    if stats.stopped_at is not None:
        t.state.epoch = epoch
        t.state.mid_epoch = {"samples": stats.stopped_at, "totals": dataclasses.asdict(stats.totals)}
        save_checkpoints(t, best=False)
        t.writer.wait()
        log.warning("stopped in epoch %d after %d samples; checkpoint saved, a resume continues there",
                    epoch + 1, stats.stopped_at)
        return False
    validate = (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs
    row = validate_epoch(t, epoch, stats) if validate else epoch_row(epoch, stats, None, t, 0.0)
    t.state.epoch, t.state.mid_epoch = epoch + 1, None
    # Best by val AUC; ties (common once AUC saturates) go to the lower val loss.
    is_best = validate and (row.val_auc, -row.val_loss) > (t.state.best_auc, -t.state.best_val_loss)
    if is_best:
        t.state.best_auc, t.state.best_val_loss, t.state.best_epoch = row.val_auc, row.val_loss, epoch + 1
    t.state.history.append(dataclasses.asdict(row))
    row.ckpt_s = save_checkpoints(t, best=is_best)
    if dist.is_main:
        write_summary(t.run, t.state.history)
        tracker.log_epoch(dataclasses.asdict(row))
        log.info("epoch %d/%d train_loss %.4f train_acc %.4f val_loss %.4f val_acc %.4f val_auc %.4f%s lr %.3g "
                 "%.0f img/s %.1fs (val %.1fs, checkpoint %.2fs)", epoch + 1, cfg.train.epochs, row.train_loss,
                 row.train_acc, row.val_loss, row.val_acc, row.val_auc, " (best)" if is_best else "", row.lr,
                 row.images_per_s, row.epoch_s, row.val_s, row.ckpt_s)
    if _any_rank(stop.requested, dist):
        log.warning("stop requested: stopping after epoch %d, checkpoint saved", epoch + 1)
        return False
    return True


def validate_epoch(t: Training, epoch: int, stats: EpochStats) -> EpochRow:
    start = time.perf_counter()
    broadcast_buffers(t.eval_model, t.dist)  # one model on every shard: rank 0's BatchNorm statistics
    val = evaluate(t.eval_model, t.loaders["val"].loader, t.loaders["val"].preprocess, t.dist, t.cfg.train.amp)
    return epoch_row(epoch, stats, val, t, time.perf_counter() - start)


def save_checkpoints(t: Training, best: bool) -> float:
    """last.pt (and best.pt) written in the background; returns the seconds the ranks were held
    up, also recorded as the last history row's ckpt_s (in the checkpoint too)."""
    start = time.perf_counter()
    rng = checkpoint.gather_rng(t.dist)  # a collective: every rank takes part
    if not t.dist.is_main:
        return 0.0
    copies = t.writer.copy({t.run.last: t.resume_state(rng), **({t.run.best: t.best_state()} if best else {})})
    seconds = time.perf_counter() - start
    for history in (t.state.history, copies[t.run.last]["history"]):
        if history and math.isnan(history[-1]["ckpt_s"]):
            history[-1]["ckpt_s"] = seconds
    t.writer.start(copies)
    return seconds


def epoch_row(epoch: int, stats: EpochStats, val: dict | None, t: Training, val_s: float) -> EpochRow:
    nan = float("nan")
    return EpochRow(
        epoch=epoch + 1, train_loss=stats.totals.train_loss, train_acc=stats.totals.train_acc,
        val_loss=float(val["loss"].mean()) if val else nan,
        val_acc=float(((val["prob"] >= 0.5) == val["label"]).mean()) if val else nan,
        val_auc=roc_auc(val["label"], val["prob"]) if val else nan, lr=t.parts.schedule.lr,
        samples_seen=stats.position, epoch_s=stats.seconds, images_per_s=stats.images / max(stats.seconds, 1e-9),
        val_s=val_s, ckpt_s=nan)


def _any_rank(flag: bool, dist: DistInfo) -> bool:
    from .distributed import all_reduce_sum
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=dist.device), dist).item() > 0)


def write_summary(run: RunDir, history: list[dict]) -> None:
    write_text(run.summary, pd.DataFrame(history, columns=SUMMARY_COLUMNS).to_csv(index=False))


def progress_bar(cfg: Config, dist: DistInfo, total: int, desc: str):
    """tqdm on rank 0 when stderr is a terminal (not in Slurm logs), unless train.progress says."""
    show = {"on": True, "off": False, "auto": sys.stderr.isatty()}[cfg.train.progress]
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True) if show and dist.is_main else None


@contextlib.contextmanager
def stop_on_signals(stop: StopFlag):
    """USR1 (Slurm's warning before the time limit) and TERM (preemption) only set a flag."""
    def handler(signum, frame):
        log.warning("received signal %d: stopping at the next sync point", signum)
        stop.requested = True
    previous = {s: signal.signal(s, handler) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
