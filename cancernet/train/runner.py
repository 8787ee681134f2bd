"""Wires config, data, model, engine, checkpoints and tracking into one training run."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import pandas as pd

from cancernet.config import Config, resolved_yaml
from cancernet.engine import checkpoint, numerics
from cancernet.engine.loaders import set_epoch
from cancernet.engine.predict import evaluate
from cancernet.engine.rundir import RunDir, prepare_run_dir
from cancernet.evaluate.evaluation import evaluate_run
from cancernet.evaluate.metrics import roc_auc
from cancernet.models.classifier import resolve_preprocessing
from cancernet.runtime.atomic import write_text
from cancernet.runtime.console import progress_bar
from cancernet.runtime.distributed import DistInfo, any_rank, barrier, broadcast_buffers
from cancernet.runtime.signals import StopFlag, forks_this_process, stop_on_signals
from cancernet.train.budget import TimeBudget
from cancernet.train.loop import EpochStats, EpochTotals, MidEpoch, train_one_epoch
from cancernet.train.state import SUMMARY_COLUMNS, EpochRow, Training, build, restore
from cancernet.train.tracking import NullTracker, start_tracker

log = logging.getLogger(__name__)


# train.select_metric: the epoch whose (auc, loss, acc) on validation ranks highest is best.pt;
# ties (common once AUC or accuracy saturate) go to the lower val loss, or to the higher AUC.
SELECT = {
    "val_auc": lambda auc, loss, acc: (auc, -loss),
    "val_loss": lambda auc, loss, acc: (-loss, auc),
    "val_acc": lambda auc, loss, acc: (acc, -loss),
}


def run(
    cfg: Config,
    dist: DistInfo,
    stop: StopFlag | None = None,
    on_epoch_end: Callable[[Training, dict], None] | None = None,
) -> str:
    """Train, validate each epoch, test the best checkpoint. Returns 'done' or 'stopped'.

    stop: set it (USR1/TERM do, from the start: a stop during set-up ends the run at its first
    sync point) to end the run at the next sync point with a checkpoint. on_epoch_end(training,
    summary row) runs on every rank after each epoch's checkpoint (tests, callers' hooks).
    """
    if cfg.model.mil != "none":  # a slide-level run: bags of tile features, not patches
        from cancernet.train import mil

        return mil.run(numerics.resolve(cfg, dist.device), dist, stop, on_epoch_end)
    with stop_on_signals(stop or StopFlag()) as stop:
        cfg = numerics.resolve(cfg, dist.device)  # train.amp=auto -> what this device gets
        cfg, preprocessing = resolve_preprocessing(cfg)  # data.mean/std/image_size null -> the weights'
        run_dir = RunDir(cfg.train.out_dir)
        resume_from = prepare_run_dir(cfg, dist, run_dir)
        saved_splits = (
            pd.read_csv(run_dir.splits, dtype={"id": str})
            if resume_from is not None and run_dir.splits.is_file()
            else None
        )
        t = build(cfg, dist, run_dir, saved_splits)
        if resume_from is not None:
            restore(t, resume_from)
        t.preprocessing = preprocessing
        meta = {"preprocessing": preprocessing, **({"resumed_from": str(resume_from)} if resume_from else {})}
        write_config(t, meta)  # once the checks passed
        if dist.is_main:
            write_summary(run_dir, t.state.history)  # matches the checkpoint
        tracker = start_tracker(cfg, dist, run_dir.root, t.state.wandb_id)
        t.state.wandb_id = tracker.run_id  # a resumed or requeued job continues the same W&B run
        budget = TimeBudget.from_config(t)
        try:
            epoch = t.state.epoch
            while epoch < t.plan.epochs:  # a time budget may fix the length inside the first epoch
                planned = t.plan.budget
                if not train_epoch(t, epoch, stop, tracker, budget, on_epoch_end):
                    return "stopped"
                if planned != t.plan.budget:
                    write_config(t, meta)  # config.yaml says what the budget came to
                epoch += 1
            t.writer.wait()
            barrier(dist)  # best.pt is complete before every rank reads it
            start = time.perf_counter()
            evaluate_run(t, tracker, {"best_epoch": t.state.best_epoch, "train_s": t.state.train_s})
            if budget is not None:
                log.info(
                    "time budget %s: training, validation and checkpoints took %.0f s; the final test "
                    "evaluation and report (not counted) %.0f s",
                    cfg.train.time_budget,
                    budget.used_s(),
                    time.perf_counter() - start,
                )
            if cfg.wandb.log_model:
                tracker.log_model(run_dir.best, {"best_val_auc": t.state.best_auc, "epoch": t.state.best_epoch})
            return "done"
        finally:
            t.writer.wait()
            tracker.finish()


def write_config(t: Training, meta: dict) -> None:
    """config.yaml: the config as run, what produced it, and the length a time budget fixed."""
    if t.dist.is_main:
        extra = {**meta, **({"time_budget": t.plan.budget} if t.plan.budget else {})}
        write_text(t.run.config, resolved_yaml(t.cfg, t.dist.world_size, extra or None))


def train_epoch(
    t: Training,
    epoch: int,
    stop: StopFlag,
    tracker: NullTracker,
    budget: TimeBudget | None = None,
    on_epoch_end: Callable[[Training, dict], None] | None = None,
) -> bool:
    """Train (and validate) one epoch, checkpoint on rank 0. False when the run must stop now."""
    cfg, dist = t.cfg, t.dist
    mid = (
        MidEpoch(t.state.mid_epoch["samples"], EpochTotals(**t.state.mid_epoch["totals"]))
        if t.state.mid_epoch
        else None
    )
    train = t.loaders["train"]
    set_epoch(train, epoch, mid.samples if mid else 0, t.plan.end_in(epoch))
    bar = progress_bar(cfg.train.progress, dist.is_main, len(train.loader), f"epoch {epoch + 1}")
    stats = train_one_epoch(
        t.parts,
        train.loader,
        train.augment,
        cfg,
        dist,
        epoch,
        position=t.state.position,
        start=mid,
        stop=stop,
        progress=bar,
        on_sync=budget.sync(epoch) if budget else None,
    )
    if bar is not None:
        bar.close()
    t.state.position, t.state.train_s = stats.position, t.state.train_s + stats.seconds
    if stats.stopped_at is not None:
        t.state.epoch = epoch
        t.state.mid_epoch = {"samples": stats.stopped_at, "totals": dataclasses.asdict(stats.totals)}
        save_checkpoints(t, best=False)
        t.writer.wait()
        log.warning(
            "stopped in epoch %d after %d samples; checkpoint saved, a resume continues there",
            epoch + 1,
            stats.stopped_at,
        )
        return False
    validate = (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == t.plan.epochs
    row = validate_epoch(t, epoch, stats) if validate else epoch_row(epoch, stats, None, t, 0.0)
    t.state.epoch, t.state.mid_epoch = epoch + 1, None
    select = SELECT[cfg.train.select_metric]
    best = (t.state.best_auc, t.state.best_val_loss, t.state.best_val_acc)
    is_best = validate and select(row.val_auc, row.val_loss, row.val_acc) > select(*best)
    if is_best:
        t.state.best_auc, t.state.best_val_loss, t.state.best_val_acc = row.val_auc, row.val_loss, row.val_acc
        t.state.best_epoch = epoch + 1
    # last.pt every epoch, or when train.checkpoint_every has passed (rank 0's clock decides for all)
    every = t.cfg.train.checkpoint_every
    last = epoch + 1 == t.plan.epochs or every is None or any_rank(t.checkpoint_due(), dist, main=True)
    save_checkpoints(t, best=is_best, row=row, last=last)
    if budget is not None:
        planned = t.plan.budget
        budget.refine(epoch, t.state.history[-1])  # measures the epoch and its checkpoint, then fixes the length
        if last and t.plan.budget != planned:
            save_checkpoints(t, best=False)  # last.pt holds the fixed length (a preemption now keeps it)
    if dist.is_main:
        write_summary(t.run, t.state.history)
        tracker.log_epoch(dataclasses.asdict(row))
        log.info(
            "epoch %d/%d train_loss %.4f train_acc %.4f val_loss %.4f val_acc %.4f val_auc %.4f%s lr %.3g%s "
            "%.0f img/s %.1fs (val %.1fs, checkpoint %.2fs)",
            epoch + 1,
            t.plan.epochs,
            row.train_loss,
            row.train_acc,
            row.val_loss,
            row.val_acc,
            row.val_auc,
            " (best)" if is_best else "",
            row.lr,
            f" ema_decay {row.ema_decay:.4g}" if t.parts.ema is not None else "",
            row.images_per_s,
            row.epoch_s,
            row.val_s,
            row.ckpt_s,
        )
    if on_epoch_end is not None:
        on_epoch_end(t, t.state.history[-1])
    if any_rank(stop.requested, dist):
        if not last:  # a stop saves at once, whatever train.checkpoint_every says
            save_checkpoints(t, best=False)
        log.warning("stop requested: stopping after epoch %d, checkpoint saved", epoch + 1)
        return False
    return True


def validate_epoch(t: Training, epoch: int, stats: EpochStats) -> EpochRow:
    start = time.perf_counter()
    # Validation runs while the previous checkpoint is written (its tensors were copied already).
    # Only where workers are forked from this process must the write be over first: a child forked
    # while the writer thread is inside torch.save can inherit one of its locks held and hang.
    if forks_this_process(t.cfg.data.num_workers):
        t.writer.wait()
    broadcast_buffers(t.eval_model, t.dist)  # one model on every shard: rank 0's BatchNorm statistics
    val = evaluate(t.scorer, t.loaders["val"].loader, t.loaders["val"].preprocess, t.dist, t.cfg.train.amp)
    return epoch_row(epoch, stats, val, t, time.perf_counter() - start)


def save_checkpoints(t: Training, best: bool, row: EpochRow | None = None, last: bool = True) -> float:
    """last.pt (if last) and best.pt (if best) written in the background; returns the seconds the
    ranks were held up. Every rank calls it with the same last and best.

    row: the epoch just finished; it joins the history with those seconds as its ckpt_s, after
    the (timed) copy of the tensors and before last.pt is written, so the file holds it too.
    """
    start = time.perf_counter()
    rng = checkpoint.gather_rng(t.dist) if last else None  # a collective: every rank takes part
    files = {t.run.last: t.resume_state(rng)} if last and t.dist.is_main else {}
    copies = t.writer.copy(files | ({t.run.best: t.best_state()} if best else {})) if t.dist.is_main else {}
    seconds = time.perf_counter() - start if t.dist.is_main else 0.0
    if row is not None:
        row.ckpt_s = seconds
        t.state.history.append(dataclasses.asdict(row))
    if t.run.last in copies:
        copies[t.run.last]["run_state"]["history"] = [dict(r) for r in t.state.history]  # plain rows: no copy
        t.last_saved = time.monotonic()
    if copies:
        t.writer.start(copies)
    return seconds


def epoch_row(epoch: int, stats: EpochStats, val: dict | None, t: Training, val_s: float) -> EpochRow:
    nan = float("nan")
    return EpochRow(
        epoch=epoch + 1,
        train_loss=stats.totals.train_loss,
        train_acc=stats.totals.train_acc,
        val_loss=float(val["loss"].mean()) if val else nan,
        val_acc=float(((val["prob"] >= 0.5) == val["label"]).mean()) if val else nan,
        val_auc=roc_auc(val["label"], val["prob"]) if val else nan,
        lr=t.parts.schedule.lr,
        samples_seen=stats.position,
        epoch_s=stats.seconds,
        images_per_s=stats.images / max(stats.seconds, 1e-9),
        val_s=val_s,
        ckpt_s=nan,
        ema_decay=t.parts.ema.last_decay if t.parts.ema is not None else nan,
    )


def write_summary(run: RunDir, history: list[dict]) -> None:
    write_text(run.summary, pd.DataFrame(history, columns=SUMMARY_COLUMNS).to_csv(index=False))
