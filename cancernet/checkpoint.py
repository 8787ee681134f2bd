"""Atomic checkpoints that load with weights_only=True, and resume."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_path
from .errors import UserError

log = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read or does not fit this run."""


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP and torch.compile wrappers (clean state-dict keys)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Write state to path atomically: readers see the old file or the new one, never half."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); it is corrupt or "
                              "not a cancernet checkpoint") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"checkpoint {path} is not a cancernet checkpoint (no model/config)")
    return state


def load_model_state(model: nn.Module, state: dict[str, Any], path: str | Path) -> None:
    """Load weights, turning a shape/key mismatch into an error that names both architectures."""
    try:
        unwrap(model).load_state_dict(state["model"])
    except RuntimeError as e:
        saved = state["config"].get("model", {})
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: it holds {saved.get('arch')} "
            f"(head {saved.get('head')}); first problem: {str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}"
        ) from None


def resume_path(resume: str, out_dir: Path) -> Path | None:
    """train.resume: auto -> last.pt if present; none -> start fresh; else an explicit path."""
    if resume == "none":
        return None
    if resume == "auto":
        last = out_dir / "checkpoints" / "last.pt"
        return last if last.is_file() else None
    return Path(resume)
