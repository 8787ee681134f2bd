"""How the device computes: train.amp=auto (the fastest correct precision) and train.deterministic."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch

from cancernet.config import Config

log = logging.getLogger(__name__)
# x86 instructions that make bf16 matrix products native on a CPU (without them oneDNN emulates
# bf16, 10-25x slower than fp32 on the development machine: docs/BENCHMARKS.md)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# CANCERNET_CPU_BF16=0|1 overrides what the flags say (a test and debugging switch: CI runs the fast
# tier once more with 0, as a CPU without native bf16 would); unset, the flags decide
CPU_BF16_ENV = "CANCERNET_CPU_BF16"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo has none."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_amp(requested: str, device: torch.device, flags: set[str] | None = None) -> tuple[str, str]:
    """(bf16 | fp16 | off, why) for train.amp on device; anything but auto stays as asked."""
    if requested != "auto":
        return requested, "as configured"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.get_device_capability(device) >= (8, 0):  # Ampere and later: native bf16
            return "bf16", f"{name} computes bf16 natively"
        return "fp16", f"{name} has no native bf16: fp16 with a GradScaler"
    forced = os.environ.get(CPU_BF16_ENV, "")
    if forced in ("0", "1"):
        why = f"{CPU_BF16_ENV}={forced}"
        return ("bf16", why) if forced == "1" else ("off", why)
    found = sorted((cpu_flags() if flags is None else flags) & set(BF16_CPU_FLAGS))
    if found:
        return "bf16", f"the CPU has {'/'.join(found)}"
    return "off", f"the CPU has none of {'/'.join(BF16_CPU_FLAGS)}, so bf16 would be emulated (much slower)"


def resolve(cfg: Config, device: torch.device) -> Config:
    """cfg with train.amp=auto replaced by what this device gets (what config.yaml records)."""
    amp, why = resolve_amp(cfg.train.amp, device)
    if cfg.train.amp == "auto":
        log.info("train.amp=auto -> %s on %s: %s", amp, device, why)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, amp=amp))


def configure(deterministic: bool, device: torch.device) -> None:
    """train.deterministic: repeatable kernels (slower) instead of the fastest ones.

    Off: cuDNN autotunes its convolution algorithms (the fastest for each shape, which may differ
    between runs) and some backward kernels add with atomics, so two GPU runs differ in the last
    bits. On: no autotuning, cuDNN's deterministic algorithms, PyTorch's deterministic kernels
    (a kernel without one warns, naming itself), and cuBLAS with a fixed workspace.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
        log.info("train.deterministic: cuDNN autotuning off, deterministic kernels on")
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = device.type == "cuda"
