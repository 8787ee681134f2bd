"""The config's own sections (optim, train, dist, wandb, report, slide) and the whole Config; the
data: and model: sections live with their packages (data/config.py, models/config.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cancernet.data.config import DataConfig
from cancernet.models.config import ModelConfig
from cancernet.runtime.errors import ConfigError
from cancernet.runtime.schema import bounded, choice


@dataclass
class OptimConfig:
    name: str = choice("adamw", "adam", "adamw", "sgd")  # adamw | adam | sgd
    lr: float = bounded(1e-3, 0)  # the peak learning rate (before lr_scale)
    lr_scale: str = choice("none", "none", "linear", "sqrt")  # lr x (global batch / base_batch), or its root
    max_lr: float | None = bounded(None, 0)  # cap on the scaled lr (null: none)
    base_batch: int = bounded(256, 1)  # the global batch that lr is given for (lr_scale)
    weight_decay: float = bounded(1e-4, 0)  # decoupled (adamw) or L2 (adam, sgd)
    decay_norm_bias: bool = False  # weight decay on normalisation weights and biases too
    momentum: float = bounded(0.9, 0, 1)  # sgd only
    schedule: str = choice("cosine", "cosine", "onecycle", "none")  # cosine | onecycle | none, over the whole run
    warmup_epochs: float = bounded(0.0, 0)  # linear warm-up from 0, in epochs (fractions allowed)
    label_smoothing: float = bounded(0.0, 0, 1, hi_open=True)  # targets 1 - e/2 and e/2
    head_lr_mult: float = bounded(1.0, 0)  # head LR = lr x head_lr_mult
    layer_decay: float = bounded(1.0, 0, 1)  # layer-wise LR decay over the backbone's stages; 1 = off


@dataclass
class TrainConfig:
    epochs: int = bounded(10, 1)  # the length in epochs (the last may be short under a time budget)
    steps: int | None = bounded(None, 1)  # the length in optimizer steps instead (any cohort size trains as long)
    patience: int | None = bounded(None, 1)  # stop after this many validations without a better select_metric
    batch_size: int = bounded(256, 1)  # per process
    eval_batch_size: int = bounded(512, 1)  # per process, for validation, test and prediction
    grad_accum: int = bounded(1, 1)  # batches per optimizer step (a global batch of batch_size x ranks x grad_accum)
    clip_grad: float | None = bounded(None, 0)  # clip the gradient norm to this (null: no clipping)
    amp: str = choice("auto", "auto", "bf16", "fp16", "off")  # on every device; auto: the fastest correct one
    deterministic: bool = False  # repeatable kernels (no cuDNN autotuning), slower on GPUs
    feature_cache: str = choice("auto", "auto", "on", "off")  # frozen backbone: its features computed once
    feature_cache_dir: str | None = None  # default: <data.root>/features (shared by all ranks)
    time_budget: str | None = field(default=None, metadata={"check": "duration"})  # e.g. 14m, 4h: fixes the length
    # last.pt at most this often (e.g. 10m; null: every epoch); the final epoch and a stop always save
    checkpoint_every: str | None = field(default=None, metadata={"check": "duration"})
    select_metric: str = choice("val_auc", "val_auc", "val_loss", "val_acc")  # what makes best.pt the best
    ema_decay: float = bounded(0.0, 0, 1, hi_open=True)  # EMA of the weights; 0 = off
    ema_warmup: int = bounded(0, 0)  # training samples over which the EMA's decay ramps up from 0; 0 = none
    device: str = choice("auto", "auto", "cpu", "cuda")  # auto: CUDA when there is one
    out_dir: str = "runs/default"  # the run directory (config, checkpoints, report)
    resume: str = "auto"  # auto | none | path to a checkpoint
    overwrite: bool = False  # a fresh run (resume=none) may replace the run files in out_dir
    seed: int = 0  # initial weights, training order, augmentation (and the splits unless data.split_seed)
    eval_every: int = bounded(1, 1)  # validate every N epochs, and always after the last
    log_every: int = bounded(50, 0)  # steps between log lines when no progress bar is shown
    sync_every: int = bounded(10, 1)  # optimizer steps between the all-ranks check for stop / NaN loss
    progress: str = choice("auto", "auto", "on", "off")  # progress bars on rank 0 (auto: when attached to a terminal)


@dataclass
class DistConfig:
    backend: str = choice("auto", "auto", "nccl", "gloo")  # auto: nccl on CUDA, gloo on CPU
    timeout_min: int = bounded(30, 1)  # minutes a collective may wait for a slow rank before the run fails


@dataclass
class WandbConfig:
    mode: str = choice("disabled", "online", "offline", "disabled")  # online | offline (wandb sync later) | disabled
    project: str = "cancernet"  # the W&B project
    entity: str | None = None  # the W&B team or user (null: your default)
    name: str | None = None  # the W&B run name (null: the run directory's name)
    tags: list[str] = field(default_factory=list)  # W&B tags
    log_model: bool = False  # upload best.pt (weights only) as a model artifact
    init_timeout: float = bounded(20.0, 1)  # seconds the online start may take before falling back


@dataclass
class ReportConfig:
    bootstrap: int = bounded(1000, 0)  # resamples for the 95% CIs; 0 = none
    calibrate: bool = True  # fit a temperature on validation predictions after training
    figures: bool = True  # write the report figures (metrics.json and predictions always)


@dataclass
class SlideConfig:
    """Whole-slide inference (predict-slide, evaluate-slides); lengths in training pixels."""

    stride: int = bounded(32, 1)  # tile step; each tile's score fills the stride x stride cell at its centre
    tissue_mpp: float = bounded(8.0, 0)  # resolution of the tissue mask (microns per pixel)
    min_saturation: float = bounded(0.05, 0, 1)  # HSV saturation above which a thumbnail pixel is stained tissue
    min_texture: float = bounded(3.0, 0)  # brightness SD (0-255, 3x3 px) above which it is textured tissue; 0 = off
    fill_holes_um2: float = bounded(5000.0, 0)  # holes in the tissue up to this area (um2) are tissue
    min_tissue: float = bounded(0.25, 0, 1, hi_open=True)  # tissue share a cell needs to be scored
    block: int = bounded(8, 1)  # cells per side read as one region (tiles overlap: one read serves many)
    top_k: int = bounded(20, 1)  # slide score: mean of the top-k cells
    score: str = choice("top_k_mean", "top_k_mean", "max")  # the mean of the top_k cells, or the highest

    def __post_init__(self):
        if self.stride % 2:
            raise ConfigError(
                f"config key 'slide.stride': {self.stride} is odd; 96 px tiles centre on their cells "
                "only with an even stride"
            )


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    slide: SlideConfig = field(default_factory=SlideConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
