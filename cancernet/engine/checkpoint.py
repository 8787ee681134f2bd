"""Checkpoints: atomic files that load with weights_only=True, written in the background; resume.

last.pt holds everything a resume needs; best.pt only what evaluation, predict and export need
(weights, config, epoch, operating point, temperature), so it costs a fraction of last.pt.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from cancernet.runtime.atomic import atomic_path
from cancernet.runtime.distributed import DistInfo, broadcast_object, broadcast_weights, gather_objects
from cancernet.runtime.errors import CheckpointError

log = logging.getLogger(__name__)
# Keys whose change makes a checkpoint's state meaningless for this run (resume refuses them).
RESUME_FIXED = (
    "model.arch",
    "model.head",
    "model.freeze_backbone",
    "model.mil",
    "optim.name",
    "data.val_fraction",
    "data.test_fraction",
    "data.limit",
    "data.groups_csv",
    "data.split_by",
    "data.folds",
    "data.fold",
    "train.seed",
)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP and torch.compile wrappers (clean state-dict keys)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process' RNG states: the CPU generator and its own CUDA device's."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def gather_rng(dist: DistInfo) -> list[dict[str, Any]]:
    """Every rank's RNG states, indexed by rank (a collective: every rank calls it)."""
    return gather_objects(rng_state(dist.device), dist)


def set_rng_state(states: list[dict[str, Any]], dist: DistInfo) -> bool:
    """Restore this rank's saved states; False when the checkpoint has none for this rank."""
    if dist.rank >= len(states):
        return False
    state = states[dist.rank]
    torch.set_rng_state(state["torch"])
    if "cuda" in state and dist.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], dist.device)
    return True


def snapshot(obj: Any, memo: dict | None = None, reuse: dict | None = None) -> Any:
    """A copy of a (nested) state whose tensors are on the CPU and no longer change with training.

    A tensor seen twice (best.pt's EMA weights are also last.pt's EMA state) is copied once, and
    `memo` ends up holding every copy by key. `reuse` is an earlier snapshot's memo: its buffers
    are copied into, so after the first checkpoint there is no allocation (and no page faults).
    Copies from a GPU go to pinned memory without blocking; the caller synchronises once.
    """
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        key = (obj.data_ptr(), obj.dtype, tuple(obj.shape), obj.stride(), obj.device)
        if key not in memo:
            source = obj.detach()
            buffer = (reuse or {}).get(key)
            if buffer is None:
                buffer = torch.empty_like(source, device="cpu", pin_memory=source.is_cuda)
            memo[key] = buffer.copy_(source, non_blocking=source.is_cuda)
        return memo[key]
    if isinstance(obj, dict):
        return {k: snapshot(v, memo, reuse) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v, memo, reuse) for v in obj)
    return obj


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Write state to path atomically: readers see the old file or the new one, never half."""
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except OSError as e:  # a full disk or quota: one line naming the file (the old one stays whole)
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}") from e


class CheckpointWriter:
    """Saves in a background thread: the caller blocks only for the copy to the CPU (and for a
    previous write still running). A crash mid-write leaves the previous file intact."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._buffers: dict = {}  # the last snapshot's CPU tensors, free once its write is done

    def copy(self, files: dict[Path, dict[str, Any]]) -> dict[Path, dict[str, Any]]:
        """The blocking part: wait for the previous write, copy the states to the CPU (into the
        previous copy's buffers). The copies are valid until the next call."""
        self.wait()
        memo: dict = {}
        copies = {path: snapshot(state, memo, self._buffers) for path, state in files.items()}
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the non-blocking copies from the GPU have landed
        self._buffers = memo
        return copies

    def start(self, copies: dict[Path, dict[str, Any]]) -> None:
        """Write copies (from copy()) in the background."""
        self._thread = threading.Thread(target=self._write, args=(copies,), name="checkpoint-writer", daemon=True)
        self._thread.start()

    def _write(self, files: dict[Path, dict[str, Any]]) -> None:
        try:
            for path, state in files.items():
                save(path, state)
        except BaseException as e:  # re-raised in the training thread by wait()
            self._error = e

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


# The checkpoint's keys, defined here only; everything else reads them through Checkpoint.
# last.pt: the training state (each part's state_dict under its key, RunState's fields at the top
# level, RNG per rank); best.pt: the weights and what evaluation adds.
MODEL, CONFIG, OPTIMIZER, SCHEDULER, SCALER, EMA = "model", "config", "optimizer", "scheduler", "scaler", "ema"
RNG, WORLD_SIZE, EPOCH, WEIGHTS, RUN_STATE = "rng", "world_size", "epoch", "weights", "run_state"
TEMPERATURE, OPERATING_POINT, OPERATING_POINT_TTA = "temperature", "operating_point", "operating_point_tta"
PREPROCESS = "preprocess"  # what the model's inputs were made with (mean, std, size), when not data.*
TASK = "task"  # the kind of run that wrote it: config.PATCH or config.SLIDE (older slide-level files: "mil")
FEATURES, FEATURE_DIM = "features", "feature_dim"  # a slide-level model's: the settings of the features it reads
TRAINING_PARTS = (OPTIMIZER, SCHEDULER, SCALER, EMA, RNG, RUN_STATE, "history")  # resume only: never sent between ranks


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class Checkpoint:
    """A loaded checkpoint, read through these accessors."""

    def __init__(self, state: dict[str, Any], path: str | Path):
        self.state, self.path = state, Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {path} cannot be read ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); it is corrupt or "
                "not a cancernet checkpoint"
            ) from None
        if not isinstance(state, dict) or MODEL not in state or CONFIG not in state:
            raise CheckpointError(f"checkpoint {path} is not a cancernet checkpoint (no model/config)")
        return cls(state, path)

    @property
    def config_dict(self) -> dict:
        return self.state[CONFIG]

    def config(self):
        from cancernet.config import from_dict

        return from_dict(self.config_dict)

    @property
    def epoch(self) -> int:
        return int(self.state.get(EPOCH, 0))

    @property
    def run_state(self) -> dict:
        """Where a training run is and what it found (train.state.RunState's fields); files written
        before it had its own key hold the fields at the top level."""
        return self.state.get(RUN_STATE, self.state)

    @property
    def task(self) -> str:
        """config.PATCH or config.SLIDE: what the checkpoint's model scores."""
        from cancernet.config import PATCH, SLIDE

        return SLIDE if self.state.get(TASK) in (SLIDE, "mil") else PATCH

    @property
    def is_resumable(self) -> bool:
        return OPTIMIZER in self.state

    def get(self, key: str, default=None):
        return self.state.get(key, default)

    def temperature(self, calibrated: bool = True) -> float:
        """The temperature evaluation fitted (1 when none, or when calibration is turned off)."""
        return float(self.state.get(TEMPERATURE) or 1.0) if calibrated else 1.0

    def operating_point(self, tta: bool) -> dict | None:
        return self.state.get(OPERATING_POINT_TTA if tta else OPERATING_POINT)

    def load_weights(self, model: nn.Module, key: str = MODEL) -> None:
        """Load weights, turning a shape/key mismatch into an error that names both architectures."""
        try:
            unwrap(model).load_state_dict(self.state[key])
        except RuntimeError as e:
            saved = self.config_dict.get("model", {})
            lines = str(e).splitlines()
            raise CheckpointError(
                f"checkpoint {self.path} does not fit this model: it holds {saved.get('arch')} "
                f"(head {saved.get('head')}); first problem: {lines[1].strip() if len(lines) > 1 else e}"
            ) from None

    def restore(self, parts: dict[str, Stateful]) -> list[str]:
        """Load each part from its key; returns the keys the checkpoint does not have."""
        missing = []
        for key, part in parts.items():
            if key not in self.state:
                missing.append(key)
            elif key == MODEL:
                self.load_weights(part)
            else:
                try:
                    part.load_state_dict(self.state[key])
                except (RuntimeError, ValueError, KeyError) as e:
                    raise CheckpointError(
                        f"checkpoint {self.path}: its {key} state does not fit this run ({e}); "
                        "model.freeze_backbone or the architecture changed"
                    ) from None
        return missing


def training_state(parts: dict[str, Stateful], run_state: dict, rng: list, config: dict, world_size: int) -> dict:
    """last.pt: every part's state under its key, the run's position and findings under RUN_STATE
    (and its epoch at the top, as in best.pt), each rank's RNG."""
    return {
        **{key: part.state_dict() for key, part in parts.items()},
        RUN_STATE: run_state,
        EPOCH: run_state["epoch"],
        RNG: rng,
        CONFIG: config,
        WORLD_SIZE: world_size,
    }


def weights_state(weights: dict, config: dict, epoch: int, which: str, **facts) -> dict:
    """best.pt: the weights (which: model | ema) and what evaluation, predict and export need."""
    return {MODEL: weights, CONFIG: config, EPOCH: epoch, WEIGHTS: which, **facts}


def read_on_main(path: str | Path, dist: DistInfo, extra: Callable[[], dict] | None = None) -> Checkpoint:
    """Rank 0 reads the checkpoint; the other ranks get what it holds besides the weights and the
    training part (config, temperature, operating points; extra() computed on rank 0). No other
    rank opens the file: on NFS-like filesystems a node may still see the file rank 0 just
    replaced (stale directory cache) or get ESTALE, and gathered metrics would mix two models
    without an error. A collective: every rank calls it; an error is raised on every rank."""
    ckpt, shared = None, None
    if dist.is_main:
        try:
            ckpt = Checkpoint.load(path)
            ckpt.state.update(extra() if extra else {})
            shared = {k: v for k, v in ckpt.state.items() if k not in (MODEL, *TRAINING_PARTS)}
        except (CheckpointError, OSError) as e:
            shared = {"error": str(e)}
    shared = broadcast_object(shared, dist)
    if "error" in shared:
        raise CheckpointError(shared["error"])  # on every rank, so none waits for the others
    return ckpt if dist.is_main else Checkpoint(shared, path)


def resume_on_main(path: str | Path, dist: DistInfo) -> Checkpoint:
    """The whole checkpoint (training parts included), read by rank 0 and sent to every rank: a
    resume that every rank takes from the same bytes, whatever its view of the filesystem. A
    collective; an error is raised on every rank."""
    state = None
    if dist.is_main:
        try:
            state = Checkpoint.load(path).state
        except (CheckpointError, OSError) as e:
            state = {"error": str(e)}
    state = broadcast_object(state, dist)
    if "error" in state and len(state) == 1:
        raise CheckpointError(state["error"])
    return Checkpoint(state, path)


def load_weights_on_main(ckpt: Checkpoint, model: nn.Module, dist: DistInfo) -> None:
    """Rank 0 loads ckpt's weights into model (from read_on_main), the others get them by broadcast."""
    error = None
    if dist.is_main:
        try:
            ckpt.load_weights(model)
        except CheckpointError as e:
            error = str(e)
    error = broadcast_object(error, dist)
    if error:
        raise CheckpointError(error)
    broadcast_weights(unwrap(model), dist)


def load_on_main(path: str | Path, model: nn.Module, dist: DistInfo) -> Checkpoint:
    """read_on_main, then its weights into model on every rank."""
    ckpt = read_on_main(path, dist)
    load_weights_on_main(ckpt, model, dist)
    return ckpt


def _setting(config: dict, key: str, default=None):
    section, name = key.split(".")
    return config.get(section, {}).get(name, default)


def check_resumable(saved_config: dict, config: dict, path: Path) -> None:
    """Refuse, before any step, a checkpoint whose model, optimizer or splits this run would change.
    A key the checkpoint's config lacks (it predates the key) counts as that key's default."""
    from cancernet.config import Config

    defaults = Config().to_dict()
    for key in RESUME_FIXED:
        before, now = _setting(saved_config, key, _setting(defaults, key)), _setting(config, key)
        if before != now:
            raise CheckpointError(
                f"checkpoint {path} was trained with {key}={before!r}; this run asks for {now!r}, which it "
                "cannot resume: use a new train.out_dir (model.pretrained=PATH starts from its weights), "
                f"or keep {key}={before!r}"
            )


def changed_settings(saved_config: dict, config: dict, sections=("train", "optim", "data")) -> list[str]:
    """'key: old -> new' for every setting of these sections that differs (the resume log line)."""
    out = []
    for section in sections:
        before, now = saved_config.get(section, {}), config.get(section, {})
        out += [
            f"{section}.{k}: {before.get(k)!r} -> {v!r}"
            for k, v in now.items()
            if k in before and before[k] != v and k not in ("resume", "out_dir")
        ]
    return out


def resume_path(resume: str, last: Path) -> Path | None:
    """train.resume: auto -> last.pt if present; none -> start fresh; else an explicit path."""
    if resume == "none":
        return None
    if resume == "auto":
        return last if last.is_file() else None
    return Path(resume)


def store_evaluation(path: Path, temperature: float, point: dict, tta_point: dict | None = None) -> None:
    """Add what evaluation chose (temperature, operating points) to a checkpoint (atomic rewrite)."""
    ckpt = Checkpoint.load(path)
    ckpt.state.update(
        {TEMPERATURE: temperature, OPERATING_POINT: point, **({OPERATING_POINT_TTA: tta_point} if tta_point else {})}
    )
    save(path, ckpt.state)
