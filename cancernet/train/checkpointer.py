"""The run's checkpoints: last.pt and best.pt, when each is written and what goes in it.

last.pt holds everything a resume needs (every part's state, the run state, each rank's RNG);
best.pt the weights validation chose (the EMA's when it is on) and what evaluation, predict and
export need. Both are copied to the CPU (the only part the ranks wait for) and written in the
background, atomically (engine/checkpoint.py). last.pt is written at most every
train.checkpoint_every (rank 0's clock decides for all), after the last epoch, and at a stop.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from cancernet.config import parse_duration
from cancernet.engine import checkpoint
from cancernet.engine.rundir import RunDir
from cancernet.runtime.distributed import DistInfo, any_rank

BUDGET_PLAN = "budget_plan"  # last.pt's run state: the length train.time_budget fixed (RunPlan.budget)


class Checkpointer:
    def __init__(self, run: RunDir, dist: DistInfo, every: str | None):
        self.run, self.dist = run, dist
        self.every_s = parse_duration(every, "train.checkpoint_every") if every else None
        self.writer = checkpoint.CheckpointWriter()
        self.last_saved = time.monotonic()  # when last.pt was last written (rank 0's clock)

    def last_due(self, final: bool) -> bool:
        """Whether this epoch's end writes last.pt: the final epoch always, else when
        train.checkpoint_every has passed on rank 0 (a collective: every rank gets its answer)."""
        if final or self.every_s is None:
            return True
        return any_rank(time.monotonic() - self.last_saved >= self.every_s, self.dist, main=True)

    def save(self, training, last: bool, best: bool, row=None) -> float:
        """last.pt (if last) and best.pt (if best) written in the background; returns the seconds
        the ranks were held up. Every rank calls it with the same last and best (a collective).

        row: the epoch just finished (an EpochRow): it joins the history with those seconds as
        its ckpt_s, after the (timed) copy of the tensors and before last.pt is written, so the
        file holds it too."""
        start = time.perf_counter()
        rng = checkpoint.gather_rng(self.dist) if last else None  # a collective: every rank takes part
        files: dict[Path, dict] = {}
        if self.dist.is_main:
            if last:
                files[self.run.last] = self.last_state(training, rng)
            if best:
                files[self.run.best] = self.best_state(training)
        copies = self.writer.copy(files) if files else {}
        seconds = time.perf_counter() - start if self.dist.is_main else 0.0
        history = training.state.history
        if row is not None:
            row.ckpt_s = seconds
            history.append(dataclasses.asdict(row))
        if self.run.last in copies:
            copies[self.run.last][checkpoint.RUN_STATE]["history"] = [dict(r) for r in history]  # plain rows
            self.last_saved = time.monotonic()
        if copies:
            self.writer.start(copies)
        return seconds

    @staticmethod
    def last_state(training, rng: list) -> dict:
        """Every part's state, the run state (its history added after the copy), each rank's RNG."""
        state = dataclasses.asdict(training.state)
        state.pop("history")
        run_state = {**state, BUDGET_PLAN: training.plan.budget}
        saved = checkpoint.training_state(
            training.stateful(), run_state, rng, training.cfg.to_dict(), training.dist.world_size
        )
        return {**saved, **training.task.facts()}

    @staticmethod
    def best_state(training) -> dict:
        state = training.state
        return checkpoint.weights_state(
            training.eval_model.state_dict(),
            training.cfg.to_dict(),
            state.epoch,
            "ema" if training.parts.ema is not None else "model",
            best_auc=state.best_auc,
            best_val_loss=state.best_val_loss,
            best_val_acc=state.best_val_acc,
            selected_by=training.cfg.train.select_metric,
            **training.task.facts(),
        )

    def wait(self) -> None:
        """Until the write in the background is done (its error raised here)."""
        self.writer.wait()
