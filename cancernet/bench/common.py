"""What the benchmarks share: the device's name and settings in each row, peak memory, a
one-process group (to time a DDP wrapper on one device), waiting for the device."""

from __future__ import annotations

import contextlib
import platform
import resource

import torch
import torch.distributed as tdist

from cancernet.config import Config


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def context(cfg: Config, device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": name,
        "threads": torch.get_num_threads(),
        "image_size": cfg.data.image_size,
        "augment": cfg.data.augment,
        "amp": cfg.train.amp,
        "channels_last": cfg.model.channels_last,
        "torch": str(torch.__version__),
    }


def peak_rss_mb() -> dict:
    """Peak resident memory of this process and of its largest finished child (loader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mb": round(own, 1), "peak_child_rss_mb": round(children, 1)}


@contextlib.contextmanager
def one_process_group(device: torch.device):
    """A process group of this process alone, so that a single device can time the DDP wrapper."""
    tdist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        store=tdist.HashStore(),
        rank=0,
        world_size=1,
        device_id=device if device.type == "cuda" else None,
    )
    try:
        yield
    finally:
        tdist.destroy_process_group()
