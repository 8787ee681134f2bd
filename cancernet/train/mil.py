"""A slide-level (MIL) training run: train_ddp.py with model.mil set (configs/mil.yaml).

Bags are slides: extract-features' <slide>.h5 under data.features, labels from data.slides_csv
(slide,label[,patient]; a patient's slides stay in one split, k-fold with data.folds/fold). One
bag per rank per optimizer step (train.grad_accum steps accumulate), each step's bags of similar
size over the ranks (data/bags.BalancedBags); training bags sample at most data.max_instances
tiles. What a patch run has, the same way: the run directory (config.yaml, splits.csv,
summary.csv, checkpoints/last.pt and best.pt written atomically in the background, resumed
from last.pt after a stop at an epoch's end), the LR schedule over samples, EMA, validation on
every rank's share of the bags gathered on every rank, the best checkpoint by
train.select_metric, and at the end the test report: slide-level AUC, balanced accuracy,
sensitivity and specificity at the validation-chosen threshold with bootstrap intervals
(report/metrics.json, the ROC and confusion matrix), per-slide predictions with attention
statistics, which `aggregate` reads over seeds and folds.
"""

from __future__ import annotations

import json
import logging
import math
import time

import numpy as np
import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from cancernet.config import Config, parse_duration, resolved_yaml
from cancernet.data.bags import Bags, BalancedBags, Order, bag_loader, slide_table
from cancernet.data.datasets import ShardSampler
from cancernet.data.splits import make_splits, reuse_splits
from cancernet.engine import checkpoint
from cancernet.engine.predict import autocast
from cancernet.engine.rundir import RunDir, prepare_run_dir
from cancernet.evaluate import plots, report
from cancernet.evaluate.evaluation import operating_point
from cancernet.evaluate.metrics import CALIBRATION, METRICS
from cancernet.models.mil import build_mil
from cancernet.runtime.atomic import atomic_path, write_text
from cancernet.runtime.distributed import (
    DistInfo,
    all_reduce_sum,
    any_rank,
    barrier,
    broadcast_object,
    gather_objects,
)
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


def scoring_loader(bags: Bags, dist: DistInfo, workers: int) -> DataLoader:
    """Every bag once over the ranks (contiguous shards); kept for the run (persistent workers)."""
    return bag_loader(bags, ShardSampler(len(bags), dist.rank, dist.world_size), workers)


def score_bags(model, loader: DataLoader, dist: DistInfo, amp: str) -> pd.DataFrame:
    """Every bag of a scoring_loader, all its tiles; on every rank: index, logit, loss, and the
    attention statistics (max, and its entropy relative to uniform). The device's numbers come
    to the host once, at the end (no wait for the device per bag)."""
    bags, index, tiles, stats = loader.dataset, [], [], []
    model.eval()
    with torch.no_grad():
        for feats, _, i in loader:
            with autocast(dist.device, amp):
                logit, attention = model(feats[None].to(dist.device, non_blocking=True).float())
            weights = torch.softmax(attention.float()[0], 0)
            entropy = -(weights * weights.clamp_min(1e-12).log()).sum() / max(math.log(len(weights)), 1e-12)
            stats.append(torch.stack([logit.float()[0], weights.max(), entropy, weights.argmax().float()]))
            index.append(int(i))
            tiles.append(len(weights))
    values = torch.stack(stats).cpu().numpy() if stats else np.zeros((0, 4))
    rows = pd.DataFrame(
        {
            "index": index,
            "logit": values[:, 0].astype(np.float64),
            "attention_max": values[:, 1],
            "attention_entropy": values[:, 2],
            "top_tile": values[:, 3].astype(np.int64),
            "tiles": tiles,
        }
    )
    frame = pd.concat(gather_objects(rows, dist)).sort_values("index")
    frame["id"] = [bags.ids[i] for i in frame["index"]]
    frame["label"] = bags.labels.numpy()[frame["index"].to_numpy()]
    logit = frame["logit"].to_numpy()
    # binary cross-entropy with logits, stably: max(x, 0) - x y + log(1 + exp(-|x|))
    frame["loss"] = np.maximum(logit, 0) - logit * frame["label"] + np.log1p(np.exp(-np.abs(logit)))
    frame["prob"] = 1 / (1 + np.exp(-logit))
    return frame.reset_index(drop=True)


def run(cfg: Config, dist: DistInfo, stop: StopFlag | None = None, on_epoch_end=None) -> str:
    """Train, validate each epoch, test the best checkpoint. Returns 'done' or 'stopped'."""
    with stop_on_signals(stop or StopFlag()) as stop:
        run_dir = RunDir(cfg.train.out_dir)
        resume_from = prepare_run_dir(cfg, dist, run_dir)
        table = _splits(cfg, dist, run_dir, resume_from is not None)
        if dist.is_main:
            write_text(
                run_dir.splits, table[["id", "split", *(["fold"] if "fold" in table else [])]].to_csv(index=False)
            )
        log.info("slides: %s", {str(k): int(v) for k, v in table["split"].value_counts().items()})
        part = {s: table[table["split"] == s].reset_index(drop=True) for s in ("train", "val", "test")}
        bags = {
            s: Bags(
                cfg.data.features,
                p["id"],
                p["label"].to_numpy(),
                cfg.data.max_instances if s == "train" else None,
                cfg.train.seed,
            )
            for s, p in part.items()
        }
        torch.manual_seed(cfg.train.seed)
        dim, made = _features(cfg, table["id"].iloc[0])
        model = build_mil(cfg.model.mil, dim).to(dist.device)
        wrapped = Loss(model)
        if dist.is_distributed:
            wrapped = DDP(wrapped, device_ids=[dist.device] if dist.device.type == "cuda" else None)
        sampler = BalancedBags(part["train"]["tiles"].to_numpy(), dist.rank, dist.world_size, cfg.train.seed)
        train_order = Order()  # this epoch's (bag, epoch) of this rank, from the sampler
        loader = bag_loader(bags["train"], train_order, cfg.data.num_workers)
        scoring = {s: scoring_loader(bags[s], dist, cfg.data.num_workers) for s in ("val", "test")}
        per_epoch = len(sampler) * dist.world_size
        plan = RunPlan(per_epoch, cfg.train.epochs)
        window = dist.world_size * cfg.train.grad_accum
        base_lr = effective_lr(cfg.optim, window)
        optimizer = torch.optim.AdamW(model.parameters(), lr=base_lr, weight_decay=cfg.optim.weight_decay)
        for group in optimizer.param_groups:
            group["lr_scale"] = 1.0
        schedule = LrSchedule(
            optimizer, cfg.optim, base_lr, lambda: plan.samples, int(cfg.optim.warmup_epochs * per_epoch)
        )
        ema = ModelEma(model, cfg.train.ema_decay, cfg.train.ema_warmup) if cfg.train.ema_decay else None
        state = {
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
        writer = checkpoint.CheckpointWriter()
        parts = {
            checkpoint.MODEL: model,
            checkpoint.OPTIMIZER: optimizer,
            checkpoint.SCHEDULER: schedule,
            **({checkpoint.EMA: ema} if ema else {}),
        }
        if resume_from is not None:
            saved = checkpoint.Checkpoint.load(resume_from)
            saved.restore(parts)
            state.update(saved.run_state)
            plan.fix(state["budget"])
            checkpoint.set_rng_state(saved.get(checkpoint.RNG) or [], dist)
            where = f"{state['mid_epoch']['steps']} steps into epoch {state['epoch'] + 1}" if state["mid_epoch"] else ""
            log.info("resumed from %s after epoch %d%s", resume_from, state["epoch"], f" ({where})" if where else "")
        if dist.is_main:
            write_text(run_dir.config, resolved_yaml(cfg, dist.world_size, {"task": "mil"}))
        tracker = start_tracker(cfg, dist, run_dir.root, state["wandb_id"])
        state["wandb_id"] = tracker.run_id
        amp, scorer = cfg.train.amp, (ema.module if ema else model)
        budget_s = parse_duration(cfg.train.time_budget) if cfg.train.time_budget else None

        def save(files: dict) -> None:
            """last.pt (and best.pt) in the background; every rank's RNG goes into last.pt."""
            rng = checkpoint.gather_rng(dist)
            if dist.is_main:
                last = checkpoint.training_state(parts, dict(state), rng, cfg.to_dict(), dist.world_size)
                writer.start(writer.copy({run_dir.last: last, **files}))

        try:
            while state["epoch"] < plan.epochs:
                epoch, start = state["epoch"], time.perf_counter()
                sampler.set_epoch(epoch)
                order = list(sampler)
                end = plan.end_in(epoch)  # a time budget's last epoch may end early
                order = order[: end // dist.world_size] if end is not None else order
                mid = state["mid_epoch"] or {"steps": 0, "loss": 0.0}
                train_order.items = [(i, epoch) for i in order[mid["steps"] :]]
                wrapped.train()
                # the loss sum of the bags trained before a stop comes back once, on rank 0
                total = torch.tensor(mid["loss"] if dist.is_main else 0.0, device=dist.device)
                steps, stopped = mid["steps"], False
                for feats, label, _ in loader:
                    feats = feats[None].to(dist.device, non_blocking=True).float()
                    with autocast(dist.device, amp):
                        _, loss = wrapped(feats, label[None].to(dist.device))
                    (loss / cfg.train.grad_accum).backward()
                    total += loss.detach().float()
                    steps += 1
                    if steps % cfg.train.grad_accum and steps != len(order):
                        continue
                    schedule.step(state["position"], window)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    state["position"] += window
                    if ema:
                        ema.update(model, state["position"])
                    # a stop request is read every train.sync_every optimizer steps (and at the epoch's end)
                    if (
                        steps < len(order)
                        and (state["position"] // window) % cfg.train.sync_every == 0
                        and any_rank(stop.requested, dist)
                    ):
                        stopped = True
                        break
                state["train_s"] += time.perf_counter() - start
                if stopped:
                    loss_sum = float(all_reduce_sum(total, dist))
                    state["mid_epoch"] = {"steps": steps, "loss": loss_sum}
                    save({})
                    writer.wait()
                    log.warning("stop requested: stopping %d steps into epoch %d, checkpoint saved", steps, epoch + 1)
                    return "stopped"
                train_s = time.perf_counter() - start
                start = time.perf_counter()
                val = score_bags(scorer, scoring["val"], dist, amp)
                row = {
                    "epoch": epoch + 1,
                    "train_loss": float(all_reduce_sum(total, dist)) / max(steps * dist.world_size, 1),
                    "val_loss": float(val["loss"].mean()),
                    "val_acc": float(((val["prob"] >= 0.5) == val["label"]).mean()),
                    "val_auc": METRICS["roc_auc"](val["label"], val["prob"]),
                    "lr": schedule.lr,
                    "samples_seen": state["position"],
                    "epoch_s": train_s,
                    "val_s": time.perf_counter() - start,
                }
                state["history"].append(row)
                state["epoch"], state["mid_epoch"] = epoch + 1, None
                if budget_s is not None and plan.budget is None:  # fixed before last.pt holds this epoch
                    plan.fix(_budget_plan(cfg, dist, budget_s, state, per_epoch, window))
                    state["budget"] = plan.budget
                select = SELECT[cfg.train.select_metric]
                is_best = state["best"] is None or select(row) > select(state["best"])
                if is_best:
                    state["best"], state["best_epoch"] = row, epoch + 1
                best = {
                    run_dir.best: checkpoint.weights_state(
                        scorer.state_dict(),
                        cfg.to_dict(),
                        epoch + 1,
                        "ema" if ema else "model",
                        task="mil",
                        features=made,  # the backbone and tiles predict-slide must extract alike
                        feature_dim=dim,
                    )
                }
                save(best if is_best and dist.is_main else {})
                if dist.is_main:
                    write_text(run_dir.summary, pd.DataFrame(state["history"], columns=COLUMNS).to_csv(index=False))
                    tracker.log_epoch(row)
                    log.info(
                        "epoch %d/%d train_loss %.4f val_loss %.4f val_auc %.4f%s lr %.3g %.1fs (val %.1fs)",
                        epoch + 1,
                        plan.epochs,
                        row["train_loss"],
                        row["val_loss"],
                        row["val_auc"],
                        " (best)" if is_best else "",
                        row["lr"],
                        train_s,
                        row["val_s"],
                    )
                if on_epoch_end is not None:
                    on_epoch_end(state, row)
                if any_rank(stop.requested, dist):
                    writer.wait()
                    log.warning("stop requested: stopping after epoch %d, checkpoint saved", epoch + 1)
                    return "stopped"
            writer.wait()
            barrier(dist)
            test_report(cfg, dist, run_dir, scoring, model, amp, tracker)
            return "done"
        finally:
            writer.wait()
            tracker.finish()


def _budget_plan(cfg: Config, dist: DistInfo, seconds: float, state: dict, per_epoch: int, window: int) -> dict:
    """train.time_budget for a slide-level run, fixed after its first epoch: as many bags as fit in
    what is left at that epoch's pace (training and validation), train.epochs the cap. Every
    rank gets rank 0's plan (the LR schedule is laid over it)."""
    plan = None
    if dist.is_main:
        row = state["history"][-1]
        used = state["train_s"] + sum(r["val_s"] for r in state["history"])
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


def test_report(cfg: Config, dist: DistInfo, run_dir: RunDir, scoring: dict, model, amp: str, tracker) -> dict | None:
    """best.pt on validation (the threshold) and test: per-slide predictions, metrics.json, figures."""
    best = checkpoint.load_on_main(run_dir.best, model, dist)
    val = score_bags(model, scoring["val"], dist, amp)
    test = score_bags(model, scoring["test"], dist, amp)
    if not dist.is_main:
        return None
    if val["label"].nunique() == 2:  # stored in best.pt: predict-slide labels new slides with it
        point = operating_point(val, None, tta=False, temperature=1.0)
        checkpoint.store_evaluation(run_dir.best, 1.0, point)
    else:
        point = {"threshold": 0.5, "method": "fixed: one class in validation", "chosen_on": "val"}
    threshold = point["threshold"]
    keep = ["id", "label", "prob", "attention_max", "attention_entropy", "top_tile", "tiles"]
    for split, frame in (("val", val), ("test", test)):
        path = run_dir.predictions(split)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, frame[keep].assign(pred=(frame["prob"] >= threshold).astype(int)).to_csv(index=False))
    metrics = report.compute_metrics(
        test,
        {"threshold": threshold, "rule": point["method"], "chosen_on": "val"},
        cfg.report.bootstrap,
        cfg.train.seed,
    )
    metrics.update(
        split="test",
        checkpoint=str(run_dir.best),
        level="slide",
        run={"task": "mil", "mil": cfg.model.mil, "best_epoch": best.epoch, "slides": len(test)},
    )
    del metrics["classification_report"]
    metrics.update({k: METRICS[k](test["label"], test["prob"]) for k in CALIBRATION}, temperature=1.0)
    run_dir.report.mkdir(parents=True, exist_ok=True)
    write_text(run_dir.metrics, json.dumps(metrics, indent=1, default=float))
    for name, figure in (
        ("roc", plots.roc(test["label"], test["prob"], threshold)),
        ("confusion_matrix", plots.confusion_matrix(test["label"], test["prob"], threshold)),
    ):
        with atomic_path(run_dir.figure(name)) as tmp:
            figure.savefig(tmp, dpi=100, format="png")
    log.info("test (slides, n=%d): %s", len(test), report.headline(metrics))
    tracker.log_summary({f"test/{k}": metrics[k] for k in ("roc_auc", "balanced_accuracy")})
    return metrics
