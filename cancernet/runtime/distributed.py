"""Process-group setup from torchrun's (or Slurm's) environment, and gather helpers."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from cancernet.runtime.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _env_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun, else from srun, else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        # Launched by srun with one task per GPU, no torchrun: rendezvous on the first node.
        if "MASTER_ADDR" not in env:
            nodes = subprocess.run(
                ["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], capture_output=True, text=True, check=True
            ).stdout.split()
            env["MASTER_ADDR"] = nodes[0]
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000))
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env["SLURM_LOCALID"])
    return 0, 1, 0


def _elastic_store(rank: int, world_size: int, timeout: datetime.timedelta):
    """Under torchrun: its store, with keys namespaced by the restart attempt; else None (env://).

    torch 2.14's elastic agent keeps one store across restarts, so a restarted group could read
    the previous attempt's gloo addresses and fail to connect (seen with --max-restarts).
    """
    env = os.environ
    if "TORCHELASTIC_RESTART_COUNT" not in env:
        return None
    agent_hosts = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = tdist.TCPStore(
        env["MASTER_ADDR"],
        int(env["MASTER_PORT"]),
        world_size,
        is_master=not agent_hosts and rank == 0,
        timeout=timeout,
    )
    return tdist.PrefixStore(f"cancernet/attempt_{env['TORCHELASTIC_RESTART_COUNT']}", store)


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


@contextlib.contextmanager
def session(device: str = "auto", backend: str = "auto", timeout_min: int = 30) -> Iterator[DistInfo]:
    """Join the process group (if launched with several processes) and always leave it."""
    rank, world_size, local_rank = _env_ranks()
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # before init, so NCCL binds each rank to its own GPU
    info = DistInfo(rank, world_size, local_rank, dev)
    if world_size > 1:
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=timeout_min)
        tdist.init_process_group(
            backend,
            store=_elastic_store(rank, world_size, timeout),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=dev if dev.type == "cuda" else None,
        )
    try:
        yield info
        # A rank that leaves while rank 0 still writes last.pt or the report ends its launcher
        # early; srun --kill-on-bad-exit, or the end of the step, then kills rank 0 mid-write. So
        # every rank leaves together, after the slowest (not on an error: a failed rank never comes).
        if tdist.is_initialized():
            tdist.barrier()
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()


def barrier(dist: DistInfo) -> None:
    if dist.is_distributed:
        tdist.barrier()


def all_reduce_sum(tensor: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    if dist.is_distributed:
        tdist.all_reduce(tensor)
    return tensor


def any_rank(flag: bool, dist: DistInfo, main: bool = False) -> bool:
    """flag on any rank (main: rank 0's flag, for every rank); a collective (on the rank's device:
    NCCL reduces CUDA tensors only)."""
    mine = flag and (dist.is_main or not main)
    return bool(all_reduce_sum(torch.tensor([float(mine)], device=dist.device), dist).item() > 0)


def gather_rows(tensor: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """Concatenate each rank's rows (lengths may differ) on every rank, without padding rows."""
    if not dist.is_distributed:
        return tensor
    n = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.world_size)]
    tdist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(dist.world_size)]
    tdist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def broadcast_object(obj, dist: DistInfo):
    """Rank 0's object on every rank."""
    if not dist.is_distributed:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn, dist: DistInfo):
    """fn() on rank 0 alone, its result on every rank; a UserError it raises is raised on every
    rank (so none waits for the others). A collective."""
    result, error = None, None
    if dist.is_main:
        try:
            result = fn()
        except UserError as e:
            error = e
    result, error = broadcast_object((result, error), dist)
    if error is not None:
        raise error
    return result


def gather_objects(obj, dist: DistInfo) -> list:
    """[rank 0's obj, rank 1's obj, ...] on every rank."""
    if not dist.is_distributed:
        return [obj]
    out = [None] * dist.world_size
    tdist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: torch.nn.Module, dist: DistInfo) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    DDP broadcasts buffers at the start of each forward, so after the last training step every
    rank holds statistics updated by its own batch; validation must use one model on all shards.
    """
    if dist.is_distributed:
        for buffer in module.buffers():
            tdist.broadcast(buffer, src=0)


def broadcast_weights(module: torch.nn.Module, dist: DistInfo) -> None:
    """Give every rank rank 0's parameters and buffers, in place."""
    if dist.is_distributed:
        with torch.no_grad():
            for tensor in module.state_dict().values():
                tdist.broadcast(tensor, src=0)
