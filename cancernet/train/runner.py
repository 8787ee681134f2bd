"""One training run of either kind: the run directory, epochs, validation, checkpoints, stops."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import pandas as pd

from cancernet.config import Config, resolved_yaml
from cancernet.engine import numerics
from cancernet.engine.rundir import RunDir, prepare_run_dir
from cancernet.evaluate.metrics import roc_auc
from cancernet.runtime.atomic import write_text
from cancernet.runtime.console import progress_bar
from cancernet.runtime.distributed import DistInfo, any_rank, barrier
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
    with stop_on_signals(stop or StopFlag()) as stop:
        cfg = numerics.resolve(cfg, dist.device)  # train.amp=auto -> what this device gets
        run_dir = RunDir(cfg.train.out_dir)
        resume_from = prepare_run_dir(cfg, dist, run_dir)
        training = build(cfg, dist, run_dir, resuming=resume_from is not None)
        cfg = training.cfg  # as the task reads it
        if resume_from is not None:
            restore(training, resume_from)
            training.meta["resumed_from"] = str(resume_from)
        write_config(training)  # once the checks passed
        if dist.is_main:
            write_summary(run_dir, training.state.history)  # matches the checkpoint
        tracker = start_tracker(cfg, dist, run_dir.root, training.state.wandb_id)
        training.state.wandb_id = tracker.run_id  # a resumed or requeued job continues the same W&B run
        budget = TimeBudget.from_config(training)
        try:
            epoch = training.state.epoch
            # a time budget may fix the length inside the first epoch; train.patience may end it early
            while epoch < training.plan.epochs and training.state.stopped_early is None:
                planned = training.plan.budget
                if not train_epoch(training, epoch, stop, tracker, budget, on_epoch_end):
                    return "stopped"
                if planned != training.plan.budget:
                    write_config(training)  # config.yaml says what the budget came to
                epoch += 1
            training.checkpointer.wait()
            barrier(dist)  # best.pt is complete before every rank reads it
            start = time.perf_counter()
            state = training.state
            training.task.test(training, tracker, {"best_epoch": state.best_epoch, "train_s": state.train_s})
            if budget is not None:
                log.info(
                    "time budget %s: training, validation and checkpoints took %.0f s; the final test "
                    "evaluation and report (not counted) %.0f s",
                    cfg.train.time_budget,
                    budget.used_s(),
                    time.perf_counter() - start,
                )
            if cfg.wandb.log_model:
                tracker.log_model(run_dir.best, {"best_val_auc": state.best_auc, "epoch": state.best_epoch})
            return "done"
        finally:
            training.checkpointer.wait()
            tracker.finish()


def write_config(training: Training) -> None:
    """config.yaml: the config as run, what produced it, and the length a time budget fixed."""
    if training.dist.is_main:
        budget = {"time_budget": training.plan.budget} if training.plan.budget else {}
        extra = {"task": training.task.kind, **training.meta, **budget}
        write_text(training.run.config, resolved_yaml(training.cfg, training.dist.world_size, extra))


def train_epoch(
    training: Training,
    epoch: int,
    stop: StopFlag,
    tracker: NullTracker,
    budget: TimeBudget | None = None,
    on_epoch_end: Callable[[Training, dict], None] | None = None,
) -> bool:
    """Train (and validate) one epoch, checkpoint on rank 0. False when the run must stop now."""
    cfg, dist, state, task = training.cfg, training.dist, training.state, training.task
    mid = MidEpoch(state.mid_epoch["samples"], EpochTotals(**state.mid_epoch["totals"])) if state.mid_epoch else None
    task.sampler.set_epoch(epoch, mid.samples if mid else 0, training.plan.end_in(epoch))
    loader = task.train_loader
    bar = progress_bar(cfg.train.progress, dist.is_main, len(loader), f"epoch {epoch + 1}")
    stats = train_one_epoch(
        training.parts,
        loader,
        task,
        cfg,
        dist,
        epoch,
        position=state.position,
        start=mid,
        stop=stop,
        progress=bar,
        on_sync=budget.sync(epoch) if budget else None,
    )
    if bar is not None:
        bar.close()
    state.position, state.train_s = stats.position, state.train_s + stats.seconds
    if stats.stopped_at is not None:
        state.epoch = epoch
        state.mid_epoch = {"samples": stats.stopped_at, "totals": dataclasses.asdict(stats.totals)}
        training.checkpointer.save(training, last=True, best=False)
        training.checkpointer.wait()
        log.warning(
            "stopped in epoch %d after %d samples; checkpoint saved, a resume continues there",
            epoch + 1,
            stats.stopped_at,
        )
        return False
    final = epoch + 1 == training.plan.epochs
    validate = (epoch + 1) % cfg.train.eval_every == 0 or final
    row = validate_epoch(training, epoch, stats) if validate else epoch_row(epoch, stats, None, training, 0.0)
    state.epoch, state.mid_epoch = epoch + 1, None
    select = SELECT[cfg.train.select_metric]
    best = (state.best_auc, state.best_val_loss, state.best_val_acc)
    is_best = validate and select(row.val_auc, row.val_loss, row.val_acc) > select(*best)
    if is_best:
        state.best_auc, state.best_val_loss, state.best_val_acc = row.val_auc, row.val_loss, row.val_acc
        state.best_epoch = epoch + 1
    if validate:
        state.stale = 0 if is_best else state.stale + 1
    patience = cfg.train.patience
    if patience is not None and state.stale >= patience and not final:
        state.stopped_early = epoch + 1
        log.info(
            "train.patience: no better %s in %d validations; training ends after epoch %d (best: epoch %d)",
            cfg.train.select_metric,
            patience,
            epoch + 1,
            state.best_epoch,
        )
    last = training.checkpointer.last_due(final or state.stopped_early is not None)
    training.checkpointer.save(training, last=last, best=is_best, row=row)
    if budget is not None:
        planned = training.plan.budget
        budget.refine(epoch, state.history[-1])  # measures the epoch and its checkpoint, then fixes the length
        if last and training.plan.budget != planned:
            training.checkpointer.save(training, last=True, best=False)  # last.pt holds the fixed length
    if dist.is_main:
        write_summary(training.run, state.history)
        tracker.log_epoch(dataclasses.asdict(row))
        log_epoch(training, row, is_best)
    if on_epoch_end is not None:
        on_epoch_end(training, state.history[-1])
    if any_rank(stop.requested, dist):
        if not last:  # a stop saves at once, whatever train.checkpoint_every says
            training.checkpointer.save(training, last=True, best=False)
        log.warning("stop requested: stopping after epoch %d, checkpoint saved", epoch + 1)
        return False
    return True


def log_epoch(training: Training, row: EpochRow, is_best: bool) -> None:
    log.info(
        "epoch %d/%d train_loss %.4f train_acc %.4f val_loss %.4f val_acc %.4f val_auc %.4f%s lr %.3g%s "
        "%.0f %s/s %.1fs (val %.1fs, checkpoint %.2fs)",
        row.epoch,
        training.plan.epochs,
        row.train_loss,
        row.train_acc,
        row.val_loss,
        row.val_acc,
        row.val_auc,
        " (best)" if is_best else "",
        row.lr,
        f" ema_decay {row.ema_decay:.4g}" if training.parts.ema is not None else "",
        row.images_per_s,
        training.task.sample_name,
        row.epoch_s,
        row.val_s,
        row.ckpt_s,
    )


def validate_epoch(training: Training, epoch: int, stats: EpochStats) -> EpochRow:
    start = time.perf_counter()
    # Validation runs while the previous checkpoint is written (its tensors were copied already).
    # Only where workers are forked from this process must the write be over first: a child forked
    # while the writer thread is inside torch.save can inherit one of its locks held and hang.
    if forks_this_process(training.cfg.data.num_workers):
        training.checkpointer.wait()
    val = training.task.validate(training.eval_model)
    return epoch_row(epoch, stats, val, training, time.perf_counter() - start)


def epoch_row(epoch: int, stats: EpochStats, val, training: Training, val_s: float) -> EpochRow:
    """The epoch's summary.csv row; val: the validation's label, prob and loss (None: not validated)."""
    nan, parts = float("nan"), training.parts
    validated = val is not None
    return EpochRow(
        epoch=epoch + 1,
        train_loss=stats.totals.train_loss,
        train_acc=stats.totals.train_acc,
        val_loss=float(val["loss"].mean()) if validated else nan,
        val_acc=float(((val["prob"] >= 0.5) == val["label"]).mean()) if validated else nan,
        val_auc=roc_auc(val["label"], val["prob"]) if validated else nan,
        lr=parts.schedule.lr,
        samples_seen=stats.position,
        epoch_s=stats.seconds,
        images_per_s=stats.images / max(stats.seconds, 1e-9),
        val_s=val_s,
        ckpt_s=nan,
        ema_decay=parts.ema.last_decay if parts.ema is not None else nan,
    )


def write_summary(run: RunDir, history: list[dict]) -> None:
    write_text(run.summary, pd.DataFrame(history, columns=SUMMARY_COLUMNS).to_csv(index=False))
