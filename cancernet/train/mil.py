"""A slide-level (MIL) training run: train_ddp.py with model.mil set (configs/mil.yaml).

Bags are slides: extract-features' <slide>.h5 under data.features, labels from data.slides_csv
(slide,label[,patient]; a patient's slides stay in one split, k-fold with data.folds/fold). One
bag per rank per optimizer step (train.grad_accum steps accumulate), each step's bags of similar
size over the ranks (data/bags.BalancedBags); training bags sample at most data.max_instances
tiles. What a patch run has, the same way: the run directory (config.yaml, splits.csv,
summary.csv, checkpoints/last.pt and best.pt written atomically in the background, resumed
exactly from last.pt after a stop, inside an epoch or at its end), train.time_budget, the LR
schedule over samples, EMA, validation on every rank's share of the bags gathered on every rank,
the best checkpoint by train.select_metric, and at the end the test report (evaluate/mil.py),
which `aggregate` reads over seeds and folds.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from cancernet.config import Config, parse_duration, resolved_yaml
from cancernet.data.bags import Bags, BalancedBags, Order, bag_loader, slide_table
from cancernet.data.splits import make_splits, reuse_splits
from cancernet.engine import checkpoint
from cancernet.engine.predict import autocast
from cancernet.engine.rundir import RunDir, prepare_run_dir
from cancernet.evaluate.metrics import METRICS
from cancernet.evaluate.mil import score_bags, scoring_loader, test_report
from cancernet.models.mil import build_mil
from cancernet.runtime.atomic import write_text
from cancernet.runtime.distributed import DistInfo, all_reduce_sum, any_rank, barrier, broadcast_object
from cancernet.runtime.signals import StopFlag, stop_on_signals
from cancernet.train.budget import SAFETY, Shape, plan_length
from cancernet.train.ema import ModelEma
from cancernet.train.optim import LrSchedule, effective_lr
from cancernet.train.plan import RunPlan
from cancernet.train.tracking import start_tracker

log = logging.getLogger(__name__)
COLUMNS = ["epoch", "train_loss", "val_loss", "val_acc", "val_auc", "lr", "samples_seen", "epoch_s", "val_s"]
SELECT = {
    "val_auc": lambda r: (r["val_auc"], -r["val_loss"]),
    "val_loss": lambda r: (-r["val_loss"], r["val_auc"]),
    "val_acc": lambda r: (r["val_acc"], -r["val_loss"]),
}


def run(cfg: Config, dist: DistInfo, stop: StopFlag | None = None, on_epoch_end=None) -> str:
    """Train, validate each epoch, test the best checkpoint. Returns 'done' or 'stopped'."""
    with stop_on_signals(stop or StopFlag()) as stop:
        r = MilRun.build(cfg, dist)
        try:
            while r.state["epoch"] < r.plan.epochs:
                epoch, start = r.state["epoch"], time.perf_counter()
                total, steps, stopped = r.train_epoch(epoch, stop)
                r.state["train_s"] += time.perf_counter() - start
                if stopped:
                    r.state["mid_epoch"] = {"steps": steps, "loss": float(all_reduce_sum(total, dist))}
                    r.save()
                    r.writer.wait()
                    log.warning("stop requested: stopping %d steps into epoch %d, checkpoint saved", steps, epoch + 1)
                    return "stopped"
                row = r.end_epoch(epoch, total, steps, time.perf_counter() - start)
                if on_epoch_end is not None:
                    on_epoch_end(r.state, row)
                if any_rank(stop.requested, dist):
                    r.writer.wait()
                    log.warning("stop requested: stopping after epoch %d, checkpoint saved", epoch + 1)
                    return "stopped"
            r.writer.wait()
            barrier(dist)
            test_report(cfg, dist, r.run_dir, r.scoring, r.model, cfg.train.amp, r.tracker)
            return "done"
        finally:
            r.writer.wait()
            r.tracker.finish()


@dataclass
class MilRun:
    """Everything one slide-level run trains with, and where it is (`state`, saved in last.pt)."""

    cfg: Config
    dist: DistInfo
    run_dir: RunDir
    sampler: BalancedBags  # each epoch's order of this rank's bags
    order: Order  # what the training loader reads this epoch: (bag, epoch)
    loader: DataLoader  # training bags; its workers live for the run
    scoring: dict[str, DataLoader]  # validation and test bags, every one once over the ranks
    model: torch.nn.Module
    wrapped: torch.nn.Module  # the model's loss, in DDP under torchrun
    optimizer: torch.optim.Optimizer
    schedule: LrSchedule
    ema: ModelEma | None
    plan: RunPlan
    features: dict  # extract-features' settings of the bags: best.pt records them
    feature_dim: int
    state: dict = field(
        default_factory=lambda: {
            "epoch": 0,  # completed epochs
            "position": 0,  # training bags seen, all ranks
            "mid_epoch": None,  # {"steps": bags per rank, "loss": their loss sum over ranks} of a stop inside one
            "best": None,
            "best_epoch": 0,
            "history": [],
            "wandb_id": None,
            "train_s": 0.0,
            "budget": None,  # the plan train.time_budget fixed (RunPlan.budget)
        }
    )
    writer: checkpoint.CheckpointWriter = field(default_factory=checkpoint.CheckpointWriter)
    tracker: object = None

    @property
    def window(self) -> int:
        """Bags per optimizer step over all ranks."""
        return self.dist.world_size * self.cfg.train.grad_accum

    @property
    def scorer(self) -> torch.nn.Module:
        """What validation scores and best.pt holds: the EMA's weights when there is one."""
        return self.ema.module if self.ema else self.model

    @property
    def parts(self) -> dict:
        return {
            checkpoint.MODEL: self.model,
            checkpoint.OPTIMIZER: self.optimizer,
            checkpoint.SCHEDULER: self.schedule,
            **({checkpoint.EMA: self.ema} if self.ema else {}),
        }

    @classmethod
    def build(cls, cfg: Config, dist: DistInfo) -> MilRun:
        """The run directory, splits, bags and loaders, model, optimizer and schedule; the state of
        last.pt when resuming; config.yaml and the tracker."""
        run_dir = RunDir(cfg.train.out_dir)
        resume_from = prepare_run_dir(cfg, dist, run_dir)
        table = _splits(cfg, dist, run_dir, resume_from is not None)
        if dist.is_main:
            columns = ["id", "split", *(["fold"] if "fold" in table else [])]
            write_text(run_dir.splits, table[columns].to_csv(index=False))
        log.info("slides: %s", {str(k): int(v) for k, v in table["split"].value_counts().items()})
        part = {s: table[table["split"] == s].reset_index(drop=True) for s in ("train", "val", "test")}
        d, seed = cfg.data, cfg.train.seed
        bags = {
            s: Bags(d.features, p["id"], p["label"].to_numpy(), d.max_instances if s == "train" else None, seed)
            for s, p in part.items()
        }
        torch.manual_seed(seed)
        dim, made = _features(cfg, table["id"].iloc[0])
        model = build_mil(cfg.model.mil, dim).to(dist.device)
        wrapped = Loss(model)
        if dist.is_distributed:
            wrapped = DDP(wrapped, device_ids=[dist.device] if dist.device.type == "cuda" else None)
        sampler = BalancedBags(part["train"]["tiles"].to_numpy(), dist.rank, dist.world_size, seed)
        order = Order()
        per_epoch = len(sampler) * dist.world_size
        plan = RunPlan(per_epoch, cfg.train.epochs)
        base_lr = effective_lr(cfg.optim, dist.world_size * cfg.train.grad_accum)
        optimizer = torch.optim.AdamW(model.parameters(), lr=base_lr, weight_decay=cfg.optim.weight_decay)
        for group in optimizer.param_groups:
            group["lr_scale"] = 1.0
        warmup = int(cfg.optim.warmup_epochs * per_epoch)
        r = cls(
            cfg=cfg,
            dist=dist,
            run_dir=run_dir,
            sampler=sampler,
            order=order,
            loader=bag_loader(bags["train"], order, d.num_workers),
            scoring={s: scoring_loader(bags[s], dist, d.num_workers) for s in ("val", "test")},
            model=model,
            wrapped=wrapped,
            optimizer=optimizer,
            schedule=LrSchedule(optimizer, cfg.optim, base_lr, lambda: plan.samples, warmup),
            ema=ModelEma(model, cfg.train.ema_decay, cfg.train.ema_warmup) if cfg.train.ema_decay else None,
            plan=plan,
            features=made,
            feature_dim=dim,
        )
        if resume_from is not None:
            saved = checkpoint.Checkpoint.load(resume_from)
            saved.restore(r.parts)
            r.state.update(saved.run_state)
            plan.fix(r.state["budget"])
            checkpoint.set_rng_state(saved.get(checkpoint.RNG) or [], dist)
            mid = r.state["mid_epoch"]
            where = f" ({mid['steps']} steps into epoch {r.state['epoch'] + 1})" if mid else ""
            log.info("resumed from %s after epoch %d%s", resume_from, r.state["epoch"], where)
        if dist.is_main:
            write_text(run_dir.config, resolved_yaml(cfg, dist.world_size, {"task": "mil"}))
        r.tracker = start_tracker(cfg, dist, run_dir.root, r.state["wandb_id"])
        r.state["wandb_id"] = r.tracker.run_id
        return r

    def train_epoch(self, epoch: int, stop: StopFlag) -> tuple[torch.Tensor, int, bool]:
        """This rank's bags of the epoch from where it stands (a resumed stop: its step), one per
        step. Returns the loss sum (rank 0 adds the one trained before a stop), the steps done,
        and whether a stop request ended it early (read every train.sync_every optimizer steps)."""
        cfg, dist, state = self.cfg, self.dist, self.state
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)
        end = self.plan.end_in(epoch)  # a time budget's last epoch may end early
        order = order[: end // dist.world_size] if end is not None else order
        mid = state["mid_epoch"] or {"steps": 0, "loss": 0.0}
        self.order.items = [(i, epoch) for i in order[mid["steps"] :]]
        self.wrapped.train()
        total = torch.tensor(mid["loss"] if dist.is_main else 0.0, device=dist.device)
        steps = mid["steps"]
        for feats, label, _ in self.loader:
            feats = feats[None].to(dist.device, non_blocking=True).float()
            with autocast(dist.device, cfg.train.amp):
                _, loss = self.wrapped(feats, label[None].to(dist.device))
            (loss / cfg.train.grad_accum).backward()
            total += loss.detach().float()
            steps += 1
            if steps % cfg.train.grad_accum and steps != len(order):
                continue
            self.schedule.step(state["position"], self.window)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            state["position"] += self.window
            if self.ema:
                self.ema.update(self.model, state["position"])
            if steps < len(order) and (state["position"] // self.window) % cfg.train.sync_every == 0:
                if any_rank(stop.requested, dist):
                    return total, steps, True
        return total, steps, False

    def end_epoch(self, epoch: int, total: torch.Tensor, steps: int, train_s: float) -> dict:
        """Validate, fix a time budget's plan (before last.pt holds the epoch), keep the best,
        save, write summary.csv and log; returns the epoch's row."""
        cfg, dist, state = self.cfg, self.dist, self.state
        start = time.perf_counter()
        val = score_bags(self.scorer, self.scoring["val"], dist, cfg.train.amp)
        row = {
            "epoch": epoch + 1,
            "train_loss": float(all_reduce_sum(total, dist)) / max(steps * dist.world_size, 1),
            "val_loss": float(val["loss"].mean()),
            "val_acc": float(((val["prob"] >= 0.5) == val["label"]).mean()),
            "val_auc": METRICS["roc_auc"](val["label"], val["prob"]),
            "lr": self.schedule.lr,
            "samples_seen": state["position"],
            "epoch_s": train_s,
            "val_s": time.perf_counter() - start,
        }
        state["history"].append(row)
        state["epoch"], state["mid_epoch"] = epoch + 1, None
        if cfg.train.time_budget and self.plan.budget is None:
            self.plan.fix(_budget_plan(cfg, dist, parse_duration(cfg.train.time_budget), state, self.plan.per_epoch))
            state["budget"] = self.plan.budget
        select = SELECT[cfg.train.select_metric]
        is_best = state["best"] is None or select(row) > select(state["best"])
        if is_best:
            state["best"], state["best_epoch"] = row, epoch + 1
        self.save(best=is_best)
        if dist.is_main:
            write_text(self.run_dir.summary, pd.DataFrame(state["history"], columns=COLUMNS).to_csv(index=False))
            self.tracker.log_epoch(row)
            log.info(
                "epoch %d/%d train_loss %.4f val_loss %.4f val_auc %.4f%s lr %.3g %.1fs (val %.1fs)",
                epoch + 1,
                self.plan.epochs,
                row["train_loss"],
                row["val_loss"],
                row["val_auc"],
                " (best)" if is_best else "",
                row["lr"],
                train_s,
                row["val_s"],
            )
        return row

    def save(self, best: bool = False) -> None:
        """last.pt (and best.pt: the scorer's weights, and the features predict-slide must make
        alike) written in the background; every rank's RNG goes into last.pt."""
        rng = checkpoint.gather_rng(self.dist)
        if not self.dist.is_main:
            return
        cfg, epoch = self.cfg.to_dict(), self.state["epoch"]
        files = {
            self.run_dir.last: checkpoint.training_state(self.parts, dict(self.state), rng, cfg, self.dist.world_size)
        }
        if best:
            files[self.run_dir.best] = checkpoint.weights_state(
                self.scorer.state_dict(),
                cfg,
                epoch,
                "ema" if self.ema else "model",
                task="mil",
                features=self.features,
                feature_dim=self.feature_dim,
            )
        self.writer.start(self.writer.copy(files))


def _splits(cfg: Config, dist: DistInfo, run: RunDir, resuming: bool) -> pd.DataFrame:
    d = cfg.data
    table = slide_table(cfg.data)
    saved = run.read_splits() if resuming else None
    if saved is not None:
        return reuse_splits(saved, table)
    grouped = table["group"].nunique() < len(table)
    groups = pd.Series(table["group"].to_numpy(), index=table["id"]) if grouped else None
    return make_splits(table, d.val_fraction, d.test_fraction, cfg.train.seed, groups, d.folds, d.fold)


def _features(cfg: Config, slide: str) -> tuple[int, dict]:
    """(feature size, the settings extract-features made them with): best.pt records the latter."""
    import h5py

    with h5py.File(f"{cfg.data.features}/{slide}.h5", "r") as f:
        return int(f["features"].shape[1]), json.loads(f.attrs.get("settings", "{}"))


def _budget_plan(cfg: Config, dist: DistInfo, seconds: float, state: dict, per_epoch: int) -> dict:
    """train.time_budget for a slide-level run, fixed after its first epoch: as many bags as fit in
    what is left at that epoch's pace (training and validation), train.epochs the cap. Every
    rank gets rank 0's plan (the LR schedule is laid over it)."""
    plan = None
    if dist.is_main:
        row = state["history"][-1]
        used = state["train_s"] + sum(r["val_s"] for r in state["history"])
        window = dist.world_size * cfg.train.grad_accum
        shape = Shape(per_epoch=per_epoch, window=window, cap=per_epoch * cfg.train.epochs, eval_every=1)
        rate = per_epoch / max(row["epoch_s"], 1e-9)
        samples = plan_length(SAFETY * (seconds - used), state["position"], shape, rate, row["val_s"])
        plan = {
            "budget_s": seconds,
            "samples": samples,
            "epochs": round(samples / per_epoch, 3),
            "bags_per_s": round(rate, 2),
            "planned_at_sample": state["position"],
            "final": True,
        }
        log.info(
            "time budget %s: %.1f bags/s training, %.1fs a validation; the run trains %d bags = %.2f epochs%s; "
            "the LR schedule ends there",
            cfg.train.time_budget,
            rate,
            row["val_s"],
            samples,
            plan["epochs"],
            " (train.epochs caps it)" if samples >= shape.cap else "",
        )
    return broadcast_object(plan, dist)


class Loss(torch.nn.Module):
    """The model's training loss as a forward (DDP synchronises the gradients of forward only)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, X: torch.Tensor, y: torch.Tensor):  # noqa: N803
        return self.model.loss(X, y)
