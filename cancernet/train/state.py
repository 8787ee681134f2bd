"""What one training run trains with (either kind): its state, how it is built from the config,
and how it is restored from a checkpoint (the schedule and hyperparameters follow the current
config)."""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from cancernet.config import Config, ModelConfig
from cancernet.data.augment import sample_seed
from cancernet.engine import checkpoint, numerics
from cancernet.engine.rundir import RunDir
from cancernet.runtime.distributed import DistInfo
from cancernet.runtime.errors import CheckpointError, ConfigError, UserError
from cancernet.train.checkpointer import BUDGET_PLAN, Checkpointer
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
from cancernet.train.task import Task, task_class

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
    images_per_s: float  # training samples (patches, or bags of a slide-level run) per second
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
    stale: int = 0  # validations since the best one (train.patience)
    stopped_early: int | None = None  # the epoch after which train.patience ended the run


@dataclass
class Training:
    """Everything one run trains with: its task (what a sample is), the model, what a step
    touches, the run's length and where it is, and its checkpoints."""

    cfg: Config
    dist: DistInfo
    run: RunDir
    task: Task
    parts: StepParts
    plan: RunPlan  # the run's length: the sampler, the schedule, the loop and the budget read it
    checkpointer: Checkpointer
    meta: dict = field(default_factory=dict)  # what config.yaml's meta records of how the task read the config
    state: RunState = field(default_factory=RunState)

    @property
    def model_without_ddp(self) -> torch.nn.Module:
        """What checkpoints and evaluation use."""
        return self.task.model

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights validation, best.pt and the test report use: the EMA when it is on."""
        return self.parts.ema.module if self.parts.ema is not None else self.model_without_ddp

    def stateful(self) -> dict[str, checkpoint.Stateful]:
        """The parts a resume restores, by their checkpoint keys (the model first)."""
        p, model = self.parts, self.model_without_ddp
        parts = {
            checkpoint.MODEL: model,
            checkpoint.OPTIMIZER: OptimizerState(p.optimizer, legacy_order(model, self.cfg.optim)),
            checkpoint.SCHEDULER: p.schedule,
            checkpoint.SCALER: ScalerState(p.scaler),
        }
        return parts | ({checkpoint.EMA: p.ema} if p.ema is not None else {})


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
    trained: torch.nn.Module,
    cfg: ModelConfig,
    dist: DistInfo,
    loss_module: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
    ddp: bool | None = None,
) -> torch.nn.Module:
    """What the loop calls: the task's loss module around what trains, in DDP (several ranks)
    and torch.compile in the order model.compile_scope asks. `model`: compile the bare model,
    then wrap it; DDP's gradient hooks then fire only after the whole compiled backward, so the
    all-reduce cannot overlap it. `ddp`: compile the wrapper; Dynamo splits the graph at DDP's
    bucket boundaries so that it can. Checkpoints always use the bare model (clean keys).
    ddp: wrap even a single process (benchmarks); default: when distributed."""
    use_ddp = dist.is_distributed if ddp is None else ddp

    def wrap(m: torch.nn.Module) -> torch.nn.Module:
        if not use_ddp:
            return m
        # No per-forward broadcast of buffers: a training forward normalises with its own batch's
        # statistics, so the running ones matter at evaluation only, where every rank gets rank 0's
        # first (broadcast_buffers before validation; checkpoints and the EMA hold rank 0's too).
        # Gradients as views of the all-reduce buckets: no copy in and out of them each step. What
        # stays is one kernel per parameter, the reducer's copy-and-divide of each new gradient into
        # its bucket (a gradient kept between steps instead costs autograd an add per parameter).
        device_ids = [dist.device] if dist.device.type == "cuda" else None
        with warnings.catch_warnings():  # newer torch renames it (forward_sync_buffers); 2.4 knows this name only
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.* is deprecated", category=FutureWarning)
            return DDP(m, device_ids=device_ids, broadcast_buffers=False, gradient_as_bucket_view=True)

    if not cfg.compile:
        return wrap(loss_module(trained))
    if cfg.compile_scope == "ddp":
        return torch.compile(wrap(loss_module(trained)))
    return wrap(loss_module(torch.compile(trained)))


def build(cfg: Config, dist: DistInfo, run: RunDir, resuming: bool = False) -> Training:
    """The run's task (data, model, loaders), its EMA, loss module, optimizer, schedule and plan.
    training.cfg is the config as the task runs it (e.g. data.mean/std null: the weights' own)."""
    cfg, meta = task_class(cfg).prepare(cfg)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    task = task_class(cfg).build(cfg, dist, run, meta, resuming)
    model_without_ddp = task.model
    ema = ModelEma(model_without_ddp, cfg.train.ema_decay, cfg.train.ema_warmup) if cfg.train.ema_decay else None
    model = wrap_for_training(task.trained, cfg.model, dist, task.loss_module)
    numerics.configure(cfg.train.deterministic, dist.device)
    torch.manual_seed(sample_seed(cfg.train.seed, dist.rank))  # each rank its own dropout masks
    optimizer = build_optimizer(cfg.optim, model_without_ddp, dist.device)
    sampler = task.sampler
    global_batch = sampler.global_batch * cfg.train.grad_accum
    base_lr = effective_lr(cfg.optim, global_batch)
    per_epoch = sampler.samples_per_epoch()
    if per_epoch == 0:
        raise ConfigError(
            f"the training split cannot fill one global batch of {sampler.global_batch} "
            f"(train.batch_size x {dist.world_size} ranks): lower train.batch_size"
        )
    steps = cfg.train.steps * global_batch if cfg.train.steps else None
    plan = RunPlan(per_epoch, cfg.train.epochs, steps_samples=steps)
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
    return Training(cfg, dist, run, task, parts, plan, Checkpointer(run, dist, cfg.train.checkpoint_every), meta)


# what the weights learned from: changed on a finished run, it would train nothing but rewrite its record
LEARNED = ("train.batch_size", "train.grad_accum", "train.clip_grad", "train.ema_decay", "train.ema_warmup")
LEARNED += ("train.seed", "train.steps", "train.epochs", "train.time_budget", "train.patience", "train.amp")
LEARNED += tuple(f"data.{k}" for k in ("augment", "jitter", "hue", "stain", "stain_sigma", "stain_bias"))
LEARNED += ("data.max_instances",)


def _refuse_retraining_a_finished_run(training: Training, changes: list[str], path) -> None:
    """A finished run asked to train with another setting (e.g. optim.lr) keeps its record: it
    would train nothing and config.yaml would name a setting its weights never saw."""
    state = training.state
    if state.position < training.plan.samples and state.stopped_early is None:
        return  # there is training left: the rest follows the new settings (the log line says so)
    learned = [c for c in changes if c.startswith("optim.") or c.split(":")[0] in LEARNED]
    if learned:
        raise CheckpointError(
            f"{training.run.root} finished training ({state.epoch} epochs); it was not trained with "
            f"{'; '.join(learned)}, and keeps its record. To train longer, raise train.epochs (or "
            "train.steps); to train with other settings, use a new train.out_dir"
        )


def restore(training: Training, path) -> None:
    """Continue from a checkpoint: weights, optimizer moments, EMA, RNG and position; the schedule
    follows the current config from the position reached."""
    ckpt = checkpoint.resume_on_main(path, training.dist)  # rank 0 reads; every rank resumes from its bytes
    checkpoint.check_resumable(ckpt.config_dict, training.cfg.to_dict(), path)
    if not ckpt.is_resumable:
        raise UserError(
            f"checkpoint {path} holds weights only (a best.pt); resume from last.pt, "
            "or start a new run from these weights with model.pretrained"
        )
    names = [f.name for f in dataclasses.fields(RunState)]
    run_state = ckpt.run_state
    mid = run_state.get("mid_epoch")
    if any(name not in run_state for name in ("position", "mid_epoch")) or (mid and "samples" not in mid):
        raise CheckpointError(
            f"checkpoint {path} was written by an older cancernet and cannot be resumed "
            "(evaluate, predict and export still read it); start a new train.out_dir"
        )
    missing = ckpt.restore(training.stateful())
    if checkpoint.EMA in missing:  # EMA turned on at this resume: it starts from the loaded weights
        training.parts.ema = ModelEma(
            training.model_without_ddp, training.cfg.train.ema_decay, training.cfg.train.ema_warmup
        )
        log.warning("the checkpoint has no EMA: the EMA starts from its weights")
    if not checkpoint.set_rng_state(ckpt.get(checkpoint.RNG) or [], training.dist):
        torch.manual_seed(sample_seed(training.cfg.train.seed, training.dist.rank, ckpt.epoch))
        log.warning("no saved RNG state for rank %d (world size changed): it draws from a new seed", training.dist.rank)
    training.state = RunState(**{name: run_state[name] for name in names if name in run_state})
    budget = run_state.get(BUDGET_PLAN, run_state.get("budget"))
    if budget is not None:
        if training.cfg.train.time_budget:  # the length stays what the budget fixed; the schedule follows it
            training.plan.fix(budget)
        else:
            log.warning(
                "train.time_budget is off now: the run's length is train.epochs=%d again, not the %.2f "
                "epochs its budget fixed",
                training.cfg.train.epochs,
                budget["epochs"],
            )
    changes = checkpoint.changed_settings(ckpt.config_dict, training.cfg.to_dict())
    if ckpt.get(checkpoint.WORLD_SIZE, training.dist.world_size) != training.dist.world_size:
        changes.append(f"world size: {ckpt.get(checkpoint.WORLD_SIZE)} -> {training.dist.world_size}")
    _refuse_retraining_a_finished_run(training, changes, path)
    mid, schedule = training.state.mid_epoch, training.parts.schedule
    log.info(
        "resumed from %s after epoch %d%s: sample %d of %d, lr %.3g%s",
        path,
        training.state.epoch,
        f" (+{mid['samples']} samples into epoch {training.state.epoch + 1})" if mid else "",
        training.state.position,
        schedule.total,
        schedule.base_lr * schedule.factor(training.state.position),
        f"; schedule rebuilt for what changed: {', '.join(changes)}" if changes else "",
    )
