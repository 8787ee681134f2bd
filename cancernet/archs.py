"""The one list of model architectures: torchvision's classification model registry."""

from __future__ import annotations

import difflib
import functools

from .errors import ConfigError


@functools.cache
def arch_names() -> tuple[str, ...]:
    """Every classification model torchvision builds (resnet18, densenet121, convnext_tiny, ...)."""
    from torchvision import models

    return tuple(models.list_models(module=models))


def check_arch(name: str, key: str = "model.arch") -> str:
    """name, or a ConfigError naming key and the closest known names."""
    names = arch_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(names)}"
        raise ConfigError(f"config key '{key}': {name!r} is not a torchvision classification model{hint}")
    return name
