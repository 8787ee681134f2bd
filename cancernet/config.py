"""Typed run configuration: dataclasses, YAML loading, dotted overrides, validation."""
from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be used; the message names the key."""


def choice(default: Any, *options: Any) -> Any:
    return field(default=default, metadata={"choices": options})


@dataclass
class DataConfig:
    root: str = "data/synthetic"
    format: str = choice("folder", "folder", "packed")
    packed_dir: str | None = None  # default: <root>/packed
    image_size: int = 96
    num_workers: int = 4
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    limit: int | None = None
    groups_csv: str | None = None  # id,group (e.g. patch -> slide); a group never spans two splits
    on_bad_image: str = choice("fail", "fail", "skip")
    augment: str = choice("dihedral", "dihedral", "seed", "none")  # seed = hflip + rotation +-10 deg
    jitter: float = 0.1  # brightness/contrast/saturation strength; 0 = off
    hue: float = 0.02
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class ModelConfig:
    arch: str = choice("resnet34", "resnet18", "resnet34", "resnet50")
    pretrained: str = "imagenet"  # imagenet | none | path to a state dict
    weights_url: str | None = None  # mirror folder for the ImageNet weight files
    freeze_backbone: bool = False
    head: str = choice("linear", "seed", "linear")
    channels_last: bool = True
    compile: bool = False


@dataclass
class OptimConfig:
    name: str = choice("adamw", "adam", "adamw", "sgd")
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = choice("cosine", "cosine", "onecycle", "none")
    warmup_epochs: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256  # per process
    eval_batch_size: int = 512
    grad_accum: int = 1
    clip_grad: float | None = None
    amp: str = choice("bf16", "bf16", "fp16", "off")
    device: str = choice("auto", "auto", "cpu", "cuda")
    out_dir: str = "runs/default"
    resume: str = "auto"  # auto | none | path to a checkpoint
    seed: int = 0
    log_every: int = 50  # steps between log lines when no progress bar is shown
    sync_every: int = 10  # steps between the all-ranks check for stop requests / non-finite loss
    progress: str = choice("auto", "auto", "on", "off")


@dataclass
class DistConfig:
    backend: str = choice("auto", "auto", "nccl", "gloo")
    timeout_min: int = 30


@dataclass
class WandbConfig:
    mode: str = choice("disabled", "online", "offline", "disabled")
    project: str = "cancernet"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    log_model: bool = True


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_value(key: str, value: Any, hint: Any, meta: typing.Mapping) -> Any:
    """Return value converted to the field's type, or raise ConfigError naming key."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _check_value(key, value, args[0], meta)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_check_value(f"{key}[{i}]", v, item, {}) for i, v in enumerate(value)]
    if hint is float and isinstance(value, str):
        with contextlib.suppress(ValueError):  # YAML 1.1 reads 1e-3 (no dot) as a string
            value = float(value)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[hint]
    if not ok:
        raise ConfigError(f"config key '{key}': expected {hint.__name__}, got {value!r}")
    value = float(value) if hint is float else value
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"config key '{key}': {value!r} is not one of {list(choices)}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise ConfigError(f"unknown config key '{key}' (known: {', '.join(fields)})")
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}': expected a section, got {value!r}")
            kwargs[name] = _build(hint, value, f"{key}.")
        else:
            kwargs[name] = _check_value(key, value, hint, fields[name].metadata)
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ['train.epochs=2', ...] into a nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier one")
        node[leaf] = yaml.safe_load(raw) if raw != "" else None
    return nested


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def from_dict(values: dict[str, Any]) -> Config:
    return _build(Config, values, "")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (or the defaults when path is None) and apply key=value overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        values.pop("meta", None)  # written by save_resolved; not a setting
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    return from_dict(_merge(values, parse_overrides(list(overrides))))


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def resolved_yaml(cfg: Config, world_size: int) -> str:
    """The config as run, plus what produced it (git commit, torch version, world size)."""
    import torch

    meta = {"git_commit": git_commit(), "torch": str(torch.__version__), "world_size": world_size}
    return yaml.safe_dump({**cfg.to_dict(), "meta": meta}, sort_keys=False)
