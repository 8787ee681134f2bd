"""What one training run trains with: its state, how it is built from the config, and how it is
restored from a checkpoint (the schedule and hyperparameters follow the current config)."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from cancernet.config import Config, ModelConfig, parse_duration
from cancernet.data.augment import sample_seed
from cancernet.engine import checkpoint, numerics
from cancernet.engine.loaders import SplitLoader, check_validation_split, load_table, make_loader
from cancernet.engine.rundir import RunDir
from cancernet.models.classifier import build_model, count_parameters
from cancernet.runtime.atomic import write_text
from cancernet.runtime.distributed import DistInfo
from cancernet.runtime.errors import CheckpointError, ConfigError, UserError
from cancernet.train import features
from cancernet.train.ema import ModelEma
from cancernet.train.loop import StepParts
from cancernet.train.optim import (
    LrSchedule,
    OptimizerState,
    build_optimizer,
    describe_groups,
    describe_lr,
    effective_lr,
    legacy_order,
)
from cancernet.train.plan import RunPlan

log = logging.getLogger(__name__)
BUDGET_PLAN = "budget_plan"  # last.pt's run state: the length train.time_budget fixed (RunPlan.budget)


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
    ema_decay: float  # of the epoch's last EMA update (nan: no EMA)


SUMMARY_COLUMNS = [f.name for f in dataclasses.fields(EpochRow)]


@dataclass
class RunState:
    """What a checkpoint adds to the weights and optimizer: where the run is and what it found."""

    epoch: int = 0  # completed epochs
    position: int = 0  # training samples seen since the run began (all ranks)
    best_auc: float = -math.inf
    best_val_loss: float = math.inf
    best_val_acc: float = -math.inf
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
    plan: RunPlan  # the run's length: the sampler, the schedule, the loop and the budget read it
    state: RunState = field(default_factory=RunState)
    writer: checkpoint.CheckpointWriter = field(default_factory=checkpoint.CheckpointWriter)
    preprocessing: str = "set in the config"  # where data.mean/std/image_size came from
    stored: features.HeadOnStoredFeatures | None = None  # train.feature_cache: the head on stored features
    last_saved: float = field(default_factory=time.monotonic)  # when last.pt was last written (rank 0)

    def checkpoint_due(self) -> bool:
        """Whether train.checkpoint_every has passed since last.pt was last written (or the run began)."""
        every = self.cfg.train.checkpoint_every
        return every is None or time.monotonic() - self.last_saved >= parse_duration(every, "train.checkpoint_every")

    @property
    def preprocess_facts(self) -> dict:
        """What the model's inputs are made with, stored in every checkpoint (predict and export use it)."""
        d = self.cfg.data
        return {"mean": d.mean, "std": d.std, "image_size": d.image_size, "crop": d.crop, "source": self.preprocessing}

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights validation, best.pt and the test report use: the EMA when it is on."""
        return self.parts.ema.module if self.parts.ema is not None else self.model_without_ddp

    @property
    def scorer(self) -> torch.nn.Module:
        """What validation runs on the loaders' inputs: eval_model, or its head on stored features."""
        return self.stored.part(self.eval_model) if self.stored else self.eval_model

    def stateful(self) -> dict[str, checkpoint.Stateful]:
        """The parts a resume restores, by their checkpoint keys (the model first)."""
        p = self.parts
        parts = {
            checkpoint.MODEL: self.model_without_ddp,
            checkpoint.OPTIMIZER: OptimizerState(p.optimizer, legacy_order(self.model_without_ddp, self.cfg.optim)),
            checkpoint.SCHEDULER: p.schedule,
            checkpoint.SCALER: ScalerState(p.scaler),
        }
        return parts | ({checkpoint.EMA: p.ema} if p.ema is not None else {})

    def resume_state(self, rng: list) -> dict:
        run_state = {**dataclasses.asdict(self.state), BUDGET_PLAN: self.plan.budget}
        state = checkpoint.training_state(self.stateful(), run_state, rng, self.cfg.to_dict(), self.dist.world_size)
        return {**state, checkpoint.PREPROCESS: self.preprocess_facts}

    def best_state(self) -> dict:
        return checkpoint.weights_state(
            self.eval_model.state_dict(),
            self.cfg.to_dict(),
            self.state.epoch,
            "ema" if self.parts.ema is not None else "model",
            best_auc=self.state.best_auc,
            best_val_loss=self.state.best_val_loss,
            best_val_acc=self.state.best_val_acc,
            selected_by=self.cfg.train.select_metric,
            **{checkpoint.PREPROCESS: self.preprocess_facts},
        )


class ScalerState:
    """The GradScaler's state (fp16); nothing when it is off (bf16, fp32) or was off when saved."""

    def __init__(self, scaler: torch.amp.GradScaler):
        self.scaler = scaler

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)


def wrap_for_training(
    model: torch.nn.Module, cfg: ModelConfig, dist: DistInfo, ddp: bool | None = None
) -> torch.nn.Module:
    """What the loop calls: DDP (several ranks) and torch.compile in the order model.compile_scope
    asks. `model`: compile the bare model, then wrap it; DDP's gradient hooks then fire only after
    the whole compiled backward, so the all-reduce cannot overlap it. `ddp`: compile the wrapper;
    Dynamo splits the graph at DDP's bucket boundaries so that it can. Checkpoints always use the
    bare model (clean keys). ddp: wrap even a single process (benchmarks); default: when distributed."""
    use_ddp = dist.is_distributed if ddp is None else ddp

    def wrap(m: torch.nn.Module) -> torch.nn.Module:
        return DDP(m, device_ids=[dist.device] if dist.device.type == "cuda" else None) if use_ddp else m

    if not cfg.compile:
        return wrap(model)
    return torch.compile(wrap(model)) if cfg.compile_scope == "ddp" else wrap(torch.compile(model))


def build(cfg: Config, dist: DistInfo, run: RunDir, saved_splits: pd.DataFrame | None = None) -> Training:
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    table, bad = load_table(cfg, dist, saved_splits)
    check_validation_split(table)
    if dist.is_main:
        write_text(run.splits, table[[c for c in ("id", "split", "fold") if c in table.columns]].to_csv(index=False))
        if bad:
            write_text(run.bad_images, pd.DataFrame(bad.items(), columns=["id", "reason"]).to_csv(index=False))
    log.info("images: %s", {str(k): int(v) for k, v in table["split"].value_counts().items()})
    model_without_ddp = build_model(cfg.model, cfg.data.image_size)
    if cfg.model.sync_bn and dist.is_distributed:
        if dist.device.type != "cuda":
            raise ConfigError("config key 'model.sync_bn': SyncBatchNorm needs CUDA devices; set it false on CPU")
        model_without_ddp = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model_without_ddp)
    model_without_ddp = model_without_ddp.to(dist.device)
    trainable, total = count_parameters(model_without_ddp)
    log.info("model %s: %d trainable of %d parameters", cfg.model.arch, trainable, total)
    stored = features.head_on_stored_features(cfg, dist, model_without_ddp, table)
    store = stored.store if stored else None
    splits = ("train", "val", "test")
    # training and validation read every epoch: their workers stay; the test split's start once
    loaders = {
        s: make_loader(cfg, dist, table[table["split"] == s], s == "train", store, persistent=s != "test")
        for s in splits
    }
    ema = ModelEma(model_without_ddp, cfg.train.ema_decay, cfg.train.ema_warmup) if cfg.train.ema_decay else None
    # with stored features the loop trains the head alone; checkpoints still hold the whole model
    model = wrap_for_training(stored.part(model_without_ddp) if stored else model_without_ddp, cfg.model, dist)
    numerics.configure(cfg.train.deterministic, dist.device)
    torch.manual_seed(sample_seed(cfg.train.seed, dist.rank))  # each rank its own dropout masks
    optimizer = build_optimizer(cfg.optim, model_without_ddp, dist.device)
    sampler = loaders["train"].sampler
    global_batch = sampler.global_batch * cfg.train.grad_accum
    base_lr = effective_lr(cfg.optim, global_batch)
    per_epoch = sampler.samples_per_epoch()
    plan = RunPlan(per_epoch, cfg.train.epochs)
    schedule = LrSchedule(optimizer, cfg.optim, base_lr, lambda: plan.samples, int(cfg.optim.warmup_epochs * per_epoch))
    log.info(
        "optimizer %s, global batch %d, lr %.3g%s; %s",
        cfg.optim.name,
        global_batch,
        base_lr,
        describe_lr(cfg.optim, base_lr),
        describe_groups(optimizer, base_lr),
    )
    scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.train.amp == "fp16")
    parts = StepParts(model, optimizer, schedule, scaler, ema)
    return Training(cfg, dist, run, table, loaders, model_without_ddp, parts, plan, stored=stored)


def restore(t: Training, path) -> None:
    """Continue from a checkpoint: weights, optimizer moments, EMA, RNG and position; the schedule
    follows the current config from the position reached."""
    ckpt = checkpoint.Checkpoint.load(path)
    checkpoint.check_resumable(ckpt.config_dict, t.cfg.to_dict(), path)
    if not ckpt.is_resumable:
        raise UserError(
            f"checkpoint {path} holds weights only (a best.pt); resume from last.pt, "
            "or start a new run from these weights with model.pretrained"
        )
    names = [f.name for f in dataclasses.fields(RunState)]
    run_state = ckpt.run_state
    if any(name not in run_state for name in ("position", "mid_epoch")):
        raise CheckpointError(
            f"checkpoint {path} was written by an older cancernet and cannot be resumed "
            "(evaluate, predict and export still read it); start a new train.out_dir"
        )
    missing = ckpt.restore(t.stateful())
    if checkpoint.EMA in missing:  # EMA turned on at this resume: it starts from the loaded weights
        t.parts.ema = ModelEma(t.model_without_ddp, t.cfg.train.ema_decay, t.cfg.train.ema_warmup)
        log.warning("the checkpoint has no EMA: the EMA starts from its weights")
    if not checkpoint.set_rng_state(ckpt.get(checkpoint.RNG) or [], t.dist):
        torch.manual_seed(sample_seed(t.cfg.train.seed, t.dist.rank, ckpt.epoch))
        log.warning("no saved RNG state for rank %d (world size changed): it draws from a new seed", t.dist.rank)
    t.state = RunState(**{name: run_state[name] for name in names if name in run_state})
    budget = run_state.get(BUDGET_PLAN)
    if budget is not None:
        if t.cfg.train.time_budget:  # the length stays what the budget fixed; the schedule follows it
            t.plan.fix(budget)
        else:
            log.warning(
                "train.time_budget is off now: the run's length is train.epochs=%d again, not the %.2f "
                "epochs its budget fixed",
                t.cfg.train.epochs,
                budget["epochs"],
            )
    changes = checkpoint.changed_settings(ckpt.config_dict, t.cfg.to_dict())
    if ckpt.get(checkpoint.WORLD_SIZE, t.dist.world_size) != t.dist.world_size:
        changes.append(f"world size: {ckpt.get(checkpoint.WORLD_SIZE)} -> {t.dist.world_size}")
    mid, schedule = t.state.mid_epoch, t.parts.schedule
    log.info(
        "resumed from %s after epoch %d%s: sample %d of %d, lr %.3g%s",
        path,
        t.state.epoch,
        f" (+{mid['samples']} samples into epoch {t.state.epoch + 1})" if mid else "",
        t.state.position,
        schedule.total,
        schedule.base_lr * schedule.factor(t.state.position),
        f"; schedule rebuilt for what changed: {', '.join(changes)}" if changes else "",
    )
