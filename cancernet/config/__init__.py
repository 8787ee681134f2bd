"""Typed run configuration: the sections (config/sections.py), the kinds of run (config/kinds.py),
YAML loading, dotted overrides, validation."""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from cancernet.config.kinds import KIND_NAMES, ONE_KIND, PATCH, SLIDE, check_kind, setting, task_kind
from cancernet.config.sections import (
    Config,
    DistConfig,
    OptimConfig,
    ReportConfig,
    SlideConfig,
    TrainConfig,
    WandbConfig,
)
from cancernet.data.config import DataConfig
from cancernet.data.formats import check_format, format_of
from cancernet.models.archs import check_arch
from cancernet.models.config import ModelConfig
from cancernet.runtime.errors import ConfigError
from cancernet.runtime.signals import auto_workers

__all__ = [
    "KIND_NAMES",
    "ONE_KIND",
    "PATCH",
    "SLIDE",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistConfig",
    "ModelConfig",
    "OptimConfig",
    "ReportConfig",
    "SlideConfig",
    "TrainConfig",
    "WandbConfig",
    "check_kind",
    "from_dict",
    "load_config",
    "resolved_yaml",
    "setting",
    "task_kind",
]


def _check_range(key: str, value: Any, bounds: tuple) -> None:
    lo, hi, hi_open = bounds
    if value is None:
        return
    if lo is not None and value < lo or hi is not None and (value >= hi if hi_open else value > hi):
        interval = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}{')' if hi_open else ']'}"
        raise ConfigError(f"config key '{key}': {value!r} is outside {interval}")


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
    if hint is str and isinstance(value, bool) and {"on", "off"} & set(meta.get("choices", ())):
        value = "on" if value else "off"  # YAML 1.1 reads train.amp=off as False
    if meta.get("check") == "duration" and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # train.time_budget=600: seconds
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
    if "range" in meta:
        _check_range(key, value, meta["range"])
    if meta.get("check") == "duration":
        parse_duration(value, key)
    return value


def parse_duration(text: str, key: str = "train.time_budget") -> float:
    """Seconds in '90s', '14m', '4h', '1h30m' or a plain number of seconds; ConfigError naming key."""
    import re

    text = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        seconds = float(text)
    else:
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", text)
        if not text or not parts:
            raise ConfigError(f"config key '{key}': {text!r} is not a duration (e.g. 90s, 14m, 4h, 1h30m)")
        hours, minutes, secs = (float(p) if p else 0.0 for p in parts.groups())
        seconds = 3600 * hours + 60 * minutes + secs
    if seconds <= 0:
        raise ConfigError(f"config key '{key}': {text!r} must be above zero")
    return seconds


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


def check(cfg: Config) -> Config:
    """The checks a section's own fields cannot make: the registries of data formats and model
    families, and settings that span several keys. Each error names a key, before any data is read."""
    check_format(cfg.data.format, "data.format")
    check_arch(cfg.model.arch, "model.arch")
    check_kind(cfg)
    d, t = cfg.data, cfg.train
    if format_of(d).source.fixed_splits:
        name = format_of(d).source.name
        for key in ("val_fraction", "test_fraction"):
            if getattr(d, key) != getattr(DataConfig, key):
                raise ConfigError(
                    f"config key 'data.{key}' does not apply to data.format={d.format}: the {name}'s "
                    "own train/valid/test splits are used"
                )
        if d.groups_csv:
            raise ConfigError(
                f"config key 'data.groups_csv' does not apply to data.format={d.format}: slide ids come from the {name}"
            )
    else:
        for key in ("val_fraction", "test_fraction"):
            if getattr(d, key) <= 0:
                raise ConfigError(
                    f"config key 'data.{key}' must be above 0: training needs a validation split "
                    "(best checkpoint) and a test split (final evaluation)"
                )
        if d.val_fraction + d.test_fraction >= 1:
            raise ConfigError("config keys 'data.val_fraction' + 'data.test_fraction' must sum below 1")
        if d.fold >= d.folds and d.folds > 1 or d.fold and d.folds == 1:
            raise ConfigError(f"config key 'data.fold': {d.fold} is not one of the {d.folds} folds (0..{d.folds - 1})")
        unused = [
            k
            for k, on in (
                ("val_fraction", d.folds > 1 or d.split_by == "pcam"),
                ("test_fraction", d.split_by == "pcam"),
            )
            if on and getattr(d, k) != getattr(DataConfig, k)
        ]
        if unused:
            raise ConfigError(
                f"config key 'data.{unused[0]}' does not apply here: with data.folds > 1 validation is "
                "one fold of the rest, and data.split_by=pcam takes PCam's own splits"
            )
    if d.mean is not None and len(d.mean) != 3 or d.std is not None and (len(d.std) != 3 or min(d.std) <= 0):
        raise ConfigError("config keys 'data.mean'/'data.std' need 3 values each (RGB), std above 0")
    if t.steps is not None and t.epochs != TrainConfig.epochs:
        raise ConfigError(
            "config keys 'train.steps' and 'train.epochs' are both set: the run's length is one of them "
            "(train.steps=null to count epochs)"
        )
    if t.resume not in ("auto", "none") and not Path(t.resume).is_file():
        raise ConfigError(f"config key 'train.resume': {t.resume} is neither auto, none nor a checkpoint file")
    return cfg


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
        try:
            node[leaf] = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            raise ConfigError(f"override '{item}': the value is not a YAML scalar") from None
    return nested


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def from_dict(values: dict[str, Any]) -> Config:
    return _build(Config, values, "")


SHIPPED = Path(__file__).parent.parent / "configs"  # configs/ of the repository, installed with the package


def config_path(name: str | Path) -> Path:
    """A config file, or the name of a shipped one (`base`, `base.yaml`: cancernet/configs/)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = SHIPPED / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.yaml")))
    raise ConfigError(f"config file {path} does not exist (shipped configs: {known})")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (or the defaults when path is None) and apply key=value overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = config_path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping of sections (data:, model:, ...), "
                f"not a {type(values).__name__}"
            )
        values.pop("meta", None)  # written by resolved_yaml; not a setting
    cfg = check(from_dict(merge(values, parse_overrides(list(overrides)))))
    if cfg.data.num_workers is None:  # resolved here, once: config.yaml records what ran
        cfg.data.num_workers = auto_workers()
    return cfg


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).resolve().parent, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def resolved_yaml(cfg: Config, world_size: int, extra_meta: dict | None = None) -> str:
    """The config as run, plus what produced it (git commit, torch version, world size)."""
    import torch

    meta = {"git_commit": git_commit(), "torch": str(torch.__version__), "world_size": world_size, **(extra_meta or {})}
    return yaml.safe_dump({**cfg.to_dict(), "meta": meta}, sort_keys=False)
