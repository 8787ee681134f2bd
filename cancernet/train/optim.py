"""Parameter groups, optimizer, and the learning-rate schedule (a function of samples seen)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import nn

from cancernet.config import OptimConfig
from cancernet.models.classifier import PatchClassifier

log = logging.getLogger(__name__)


def _labelled(model: nn.Module, cfg: OptimConfig):
    """(name, parameter, stage, decayed) of each trainable parameter, in the model's order. A
    patch classifier's backbone stages count up to its head; any other model (a slide-level one)
    is one stage, its 'head'."""
    if isinstance(model, PatchClassifier):
        stage_of, named = model.parameter_stages(), model.net.named_parameters()
    else:
        stage_of, named = None, model.named_parameters()
    for name, p in named:
        if p.requires_grad:
            yield name, p, stage_of[name] if stage_of else 0, p.ndim > 1 or cfg.decay_norm_bias


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters in groups of equal hyperparameters (lr_scale, weight decay).

    Stage i of K backbone stages gets lr x layer_decay^(K - i), the head lr x head_lr_mult.
    Normalisation weights and biases (1-d tensors) get no weight decay unless decay_norm_bias.
    Parameters whose hyperparameters agree share a group: the fused optimizer launches a kernel
    or two per group, so one recipe without layer decay takes 2 groups, not 12 (a GPU step is
    bound by launches at small batches). Each group names its parameters (param_names), so a
    resume that changes the grouping still finds every parameter's moments (OptimizerState).
    """
    n_stages = max(model.parameter_stages().values()) if isinstance(model, PatchClassifier) else 0  # the head's
    groups: dict[tuple[float, float], dict] = {}
    for name, p, stage, decayed in _labelled(model, cfg):
        scale = cfg.head_lr_mult if stage == n_stages else cfg.layer_decay ** (n_stages - stage)
        decay = cfg.weight_decay if decayed else 0.0
        group = groups.setdefault(
            (scale, decay), {"params": [], "param_names": [], "labels": [], "weight_decay": decay, "lr_scale": scale}
        )
        group["params"].append(p)
        group["param_names"].append(name)
        label = f"{'head' if stage == n_stages else f'stage{stage}'}/{'decay' if decayed else 'no_decay'}"
        if label not in group["labels"]:
            group["labels"].append(label)
    return [{**g, "name": ",".join(g.pop("labels"))} for g in groups.values()]


def legacy_order(model: nn.Module, cfg: OptimConfig) -> list[str] | None:
    """Parameter names in the order of checkpoints written before groups were merged (one group
    per (stage, decayed), in that order), whose optimizer state names no parameter; None for
    models that had no such checkpoints (slide-level ones)."""
    if not isinstance(model, PatchClassifier):
        return None
    labelled = sorted(_labelled(model, cfg), key=lambda row: (row[2], row[3]))  # stable: the model's order within
    return [name for name, *_ in labelled]


def effective_lr(cfg: OptimConfig, global_batch: int) -> float:
    """optim.lr scaled with the global batch (optim.lr_scale: linear, sqrt or none), at most optim.max_lr."""
    ratio = global_batch / cfg.base_batch
    lr = cfg.lr * {"linear": ratio, "sqrt": ratio**0.5, "none": 1.0}[cfg.lr_scale]
    return min(lr, cfg.max_lr) if cfg.max_lr is not None else lr


def describe_lr(cfg: OptimConfig, lr: float) -> str:
    """How optim.lr became lr, for the start-up log line."""
    if cfg.lr_scale == "none":
        return ""
    how = "linearly" if cfg.lr_scale == "linear" else "by the square root"
    capped = f", capped at optim.max_lr {cfg.max_lr:g}" if cfg.max_lr is not None and lr == cfg.max_lr else ""
    return f" (optim.lr {cfg.lr:g} scaled {how} from batch {cfg.base_batch}{capped})"


def build_optimizer(cfg: OptimConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """Fused kernels on every device (torch >= 2.4): one kernel per step, step counters kept on the
    parameters' device (no .item() per parameter), and with fp16 GradScaler skips inf steps
    without a host-device sync. On CPU they are also faster (ResNet18 AdamW step: 70 -> 13 ms)."""
    groups = param_groups(model, cfg)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, fused=True)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, fused=True)


def describe_groups(optimizer: torch.optim.Optimizer, base_lr: float) -> str:
    """One line per distinct (lr, weight decay): which groups, how many parameters."""
    rows: dict[tuple[float, float], list] = {}
    for g in optimizer.param_groups:
        row = rows.setdefault((base_lr * g["lr_scale"], g["weight_decay"]), [[], 0])
        row[0].append(g["name"])
        row[1] += sum(p.numel() for p in g["params"])
    return "; ".join(
        f"lr {lr:.3g} wd {wd:g}: {n:,} params in {','.join(names)}" for (lr, wd), (names, n) in rows.items()
    )


class OptimizerState:
    """The optimizer as a checkpoint part: its moments are restored, parameter by parameter
    (by name, so a resume may regroup them), its hyperparameters (lr scales, weight decay, ...)
    stay this run's."""

    def __init__(self, optimizer: torch.optim.Optimizer, legacy: list[str] | None = None):
        self.optimizer, self.legacy = optimizer, legacy

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        current = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(self._regrouped(state))
        for group, hyper in zip(self.optimizer.param_groups, current):
            group.update(hyper)

    def _regrouped(self, state: dict) -> dict:
        """The saved state re-indexed to this optimizer's groups, matching parameters by name."""
        names = [n for g in self.optimizer.param_groups for n in g["param_names"]]
        saved_ids = [i for g in state["param_groups"] for i in g["params"]]
        saved_names = [n for g in state["param_groups"] for n in g.get("param_names", [])] or self.legacy or []
        sizes = [len(g["params"]) for g in state["param_groups"]]
        if saved_names == names and sizes == [len(g["params"]) for g in self.optimizer.param_groups]:
            return state
        if sorted(saved_names) != sorted(names) or len(saved_names) != len(saved_ids):
            return state  # other parameters: the optimizer's own check names the mismatch
        where = dict(zip(saved_names, saved_ids))
        moments = {i: state["state"][where[n]] for i, n in enumerate(names) if where[n] in state["state"]}
        groups, start = [], 0
        for g in self.optimizer.param_groups:
            groups.append(
                {
                    **{k: v for k, v in g.items() if k != "params"},
                    "params": list(range(start, start + len(g["params"]))),
                }
            )
            start += len(g["params"])
        return {"state": moments, "param_groups": groups}


class LrSchedule:
    """Sets each group's lr = base_lr x lr_scale x factor(position), position = samples seen.

    Measured in samples, not steps, so a resumed run with more epochs, another world size or
    batch size continues on the same curve: the schedule is rebuilt from the current config and
    placed where the run has got to.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        cfg: OptimConfig,
        base_lr: float,
        total_samples: int | Callable[[], int],
        warmup_samples: int,
    ):
        """total_samples: where the schedule ends, or a function that says it (the run plan's
        length, which a time budget fixes during the run)."""
        self.optimizer, self.name, self.base_lr = optimizer, cfg.schedule, base_lr
        self._total, self.warmup = total_samples, warmup_samples
        self.position, self.last_factor = 0, self.factor(0)

    @property
    def total(self) -> int:
        return max(self._total() if callable(self._total) else self._total, 1)

    def factor(self, position: int, step_samples: int = 0) -> float:
        """Multiplier on base_lr for a step taken after `position` samples (step_samples in it)."""
        if self.name == "onecycle":  # as torch's OneCycleLR (cosine both ways), without momentum cycling
            progress, peak = min(position / self.total, 1.0), 0.3
            if progress < peak:
                return _cosine(1 / 25, 1.0, progress / peak)
            return _cosine(1.0, 1 / 25e4, (progress - peak) / (1 - peak))
        if position < self.warmup:
            return min(1.0, (position + step_samples) / self.warmup)
        if self.name == "none":
            return 1.0
        progress = (position - self.warmup) / max(1, self.total - self.warmup)
        return _cosine(1.0, 0.0, min(progress, 1.0))

    def step(self, position: int, step_samples: int = 0) -> None:
        self.position = position
        self.last_factor = self.factor(position, step_samples)
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * group["lr_scale"] * self.last_factor

    @property
    def lr(self) -> float:
        """The lr of a group with lr_scale 1 at the last step (what summary.csv shows)."""
        return self.base_lr * self.last_factor

    def state_dict(self) -> dict:
        return {
            "schedule": self.name,
            "position": self.position,
            "total_samples": self.total,
            "warmup_samples": self.warmup,
            "base_lr": self.base_lr,
        }

    def load_state_dict(self, state: dict) -> None:
        """Where the last step was; the curve itself (total, warm-up, base lr) follows this run's config."""
        self.position = state["position"]
        self.last_factor = self.factor(self.position)


def _cosine(start: float, end: float, t: float) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))
