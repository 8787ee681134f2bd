"""Throughput benchmarks: the data path, the model's train step (the ceiling), the real loop, slides.

Each returns one JSON-able dict per measurement; `python -m cancernet bench` prints them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import platform
import resource
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.nn.functional as F

from cancernet.config import Config
from cancernet.data.datasets import to_device
from cancernet.data.formats import format_of, open_source_pack
from cancernet.engine import numerics
from cancernet.engine.loaders import make_loader, set_epoch
from cancernet.engine.predict import autocast
from cancernet.models.classifier import build_for_weights
from cancernet.runtime.distributed import DistInfo, pick_device
from cancernet.train.loop import train_one_epoch
from cancernet.train.optim import build_optimizer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _context(cfg: Config, device: torch.device) -> dict:
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


def bench_data(cfg: Config, batches: int, warmup: int = 2, paths=("folder", "packed")) -> Iterator[dict]:
    """Training batches per second through each path, twice: the loader alone (uint8 patches
    out) and with the augmentation on the training device.

    batches=0 iterates one whole epoch (and reports peak memory).
    """
    device = pick_device(cfg.train.device, 0)
    cfg = numerics.resolve(cfg, device)
    dist = DistInfo(device=device)
    for path, augmented in itertools.product(paths, (False, True)):
        path_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, format=path))
        fmt = format_of(path_cfg.data)
        frame = fmt.source.table(path_cfg.data, open_source_pack(path_cfg.data) if fmt.packed else None)
        frame = frame.assign(split="train")
        split = make_loader(path_cfg, dist, frame, train=True)
        set_epoch(split, 0)
        total = len(split.loader) if batches == 0 else warmup + batches
        seen, start = 0, time.perf_counter()
        for step, batch in enumerate(itertools.islice(split.loader, total)):
            if step == warmup and batches:
                _sync(device)
                start, seen = time.perf_counter(), 0
            (images, labels), index = to_device(batch[:2], device), batch[2]
            if augmented:
                split.augment(images, index, 0)
            seen += len(labels)
        _sync(device)
        seconds = time.perf_counter() - start
        yield (
            {
                "bench": "data",
                "path": path,
                "augmented": augmented,
                "images_per_s": round(seen / seconds, 1),
                "images": seen,
                "seconds": round(seconds, 3),
                "batch_size": cfg.train.batch_size,
                "num_workers": cfg.data.num_workers,
                **_context(cfg, device),
                **(peak_rss_mb() if batches == 0 else {}),
            }
        )


@contextlib.contextmanager
def _one_process_group(device: torch.device):
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


def bench_step(cfg: Config, steps: int, warmup: int = 5, ddp: bool = False) -> dict:
    """Forward + backward + optimizer step on synthetic on-device batches: the loop's ceiling.

    ddp: inside a DDP wrapper (a one-process group), with torch.compile where model.compile_scope
    puts it: the cost of the wrapper and of the graph breaks, not of the all-reduce itself."""
    device = pick_device(cfg.train.device, 0)
    cfg = numerics.resolve(cfg, device)
    with _one_process_group(device) if ddp else contextlib.nullcontext():
        return _bench_step(cfg, device, steps, warmup, ddp)


def _bench_step(cfg: Config, device: torch.device, steps: int, warmup: int, ddp: bool) -> dict:
    from cancernet.train.state import wrap_for_training

    model = build_for_weights(cfg).to(device)
    optimizer = build_optimizer(cfg.optim, model, device)
    model = wrap_for_training(model, cfg.model, DistInfo(device=device), ddp=ddp)  # the bare forward: logits
    n, size = cfg.train.batch_size, cfg.data.image_size
    images = torch.randn(n, 3, size, size, device=device)
    if cfg.model.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 2, (n,), device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model.train()
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        with autocast(device, cfg.train.amp):
            loss = F.cross_entropy(model(images).float(), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    seconds = time.perf_counter() - start
    return {
        "bench": "step",
        "arch": cfg.model.arch,
        "compile": cfg.model.compile,
        "ddp": ddp,
        "compile_scope": cfg.model.compile_scope if cfg.model.compile and ddp else None,
        "images_per_s": round(steps * n / seconds, 1),
        "batch_size": n,
        "steps": steps,
        "seconds": round(seconds, 3),
        **_context(cfg, device),
    }


class _Limited:
    """The first n batches of a loader, with a length (what the training loop expects)."""

    def __init__(self, loader, n: int):
        self.loader, self.n = loader, n

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.n)

    def __len__(self) -> int:
        return self.n


def bench_train(cfg: Config, steps: int, warmup: int = 5) -> Iterator[dict]:
    """The real training loop (loader, device augmentation, AMP, optimizer) over `steps` batches,
    then one epoch boundary: validation and the blocking part of a checkpoint. Two rows, each
    yielded as soon as it is measured (a time box that ends during the boundary keeps the first)."""
    from cancernet.engine.rundir import RunDir
    from cancernet.train.runner import validate_epoch
    from cancernet.train.state import build

    with tempfile.TemporaryDirectory() as tmp:
        cfg = dataclasses.replace(
            cfg,
            train=dataclasses.replace(cfg.train, out_dir=tmp, log_every=0, progress="off", grad_accum=1),
            data=dataclasses.replace(cfg.data, val_fraction=0.02, test_fraction=0.01),
        )
        device = pick_device(cfg.train.device, 0)
        training = build(numerics.resolve(cfg, device), DistInfo(device=device), RunDir(tmp))
        cfg, task, timings = training.cfg, training.task, []
        for epoch, n in enumerate((warmup, steps)):
            task.sampler.set_epoch(epoch)
            _sync(device)
            start = time.perf_counter()
            loader = _Limited(task.train_loader, n)
            stats = train_one_epoch(training.parts, loader, task, cfg, training.dist, epoch, position=0)
            _sync(device)
            timings.append((stats.images, time.perf_counter() - start))
            if epoch == 1:
                yield _train_row(cfg, device, *timings[1])
        row = validate_epoch(training, 1, stats)
        ckpt_s = training.checkpointer.save(training, last=True, best=True)
        training.checkpointer.wait()
        yield {
            "bench": "boundary",
            "path": cfg.data.format,
            "arch": cfg.model.arch,
            "val_s": round(row.val_s, 3),
            "val_images": len(task.loaders["val"].ids),
            "ckpt_s": round(ckpt_s, 3),
            "batch_size": cfg.train.batch_size,
            **_context(cfg, device),
        }


def _train_row(cfg: Config, device: torch.device, images: int, seconds: float) -> dict:
    return {
        "bench": "train",
        "path": cfg.data.format,
        "arch": cfg.model.arch,
        "compile": cfg.model.compile,
        "images_per_s": round(images / seconds, 1),
        "images": images,
        "seconds": round(seconds, 3),
        "batch_size": cfg.train.batch_size,
        "num_workers": cfg.data.num_workers,
        **_context(cfg, device),
        **peak_rss_mb(),
    }


def bench_slide(cfg: Config, slide: str, repeats: int = 2) -> dict:
    """predict-slide over one slide with cfg's model (its weights do not matter for speed):
    tiles per second from reading to probabilities, and the share of that time the model waited
    for the reader. The first pass warms up (workers, autotuning, page cache); the last counts."""
    from cancernet.wsi.heatmap import Scorer

    device = pick_device(cfg.train.device, 0)
    amp, _ = numerics.resolve_amp(cfg.train.amp, device)
    model = build_for_weights(cfg).to(device).eval()
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    scorer = Scorer(
        model,
        cfg,
        dist,
        "(bench: untrained)",
        cfg.data.mpp,
        amp=amp,
        batch_size=cfg.train.eval_batch_size,
        num_workers=cfg.data.num_workers,
    )
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            scorer.job(Path(tmp) / str(i)).run(Path(slide))
        summary = json.loads((Path(tmp) / str(repeats - 1) / Path(slide).stem / "slide.json").read_text())
    return {
        "bench": "slide",
        **_context(cfg, device),
        "arch": cfg.model.arch,
        "amp": amp,
        "num_workers": cfg.data.num_workers,
        "batch_size": cfg.train.eval_batch_size,
        "block": cfg.slide.block,
        "tiles": summary["tiles"],
        "seconds": round(summary["seconds"], 3),
        "tiles_per_s": round(summary["tiles_per_s"], 1),
        "reader_wait_share": round(summary["reader_wait_s"] / summary["seconds"], 3),
        "pixels_read_per_cell_pixel": round(summary["pixels_read_per_cell_pixel"], 2),
        **peak_rss_mb(),
    }


def bench_ops(cfg: Config, batch: int = 8) -> dict:
    """Operations (aten calls, each a kernel launch on a GPU) that one eager training step
    dispatches, by phase: the model (forward, loss, backward), everything else around it
    (augmentation, optimizer step, EMA, the loss and accuracy sums), and what the DDP wrapper adds
    to the model's phase (ddp_ops: the step again inside DDP, a one-process gloo group). A step
    whose other ops rival the model's is launch-bound on a GPU at small batches. Counted on the
    CPU, the third step of each."""
    from cancernet.train.patch_task import ClassifierLoss
    from cancernet.train.state import wrap_for_training

    device = torch.device("cpu")
    cfg = numerics.resolve(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device="cpu")), device)
    model = build_for_weights(cfg).train()
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    counts, groups = _count_step(cfg, model, ClassifierLoss(model, cfg.optim.label_smoothing), batch)
    with _one_process_group(device):
        loss = lambda m: ClassifierLoss(m, cfg.optim.label_smoothing)  # noqa: E731
        wrapped = wrap_for_training(model, cfg.model, DistInfo(device=device), loss, ddp=True)
        ddp_ops = _count_step(cfg, model, wrapped, batch)[0]["model"] - counts["model"]
    other = sum(n for name, n in counts.items() if name != "model")
    return {
        "bench": "ops",
        "arch": cfg.model.arch,
        "batch_size": batch,
        "param_groups": groups,
        **{f"{name}_ops": n for name, n in counts.items()},
        "other_ops": other,
        "ddp_ops": ddp_ops,
        "other_share": round(other / counts["model"], 3),
        "other_and_ddp_share": round((other + ddp_ops) / counts["model"], 3),
        **_context(cfg, device),
    }


def _count_step(cfg: Config, model, step_module, batch: int) -> tuple[dict[str, int], int]:
    """({phase: ops} of the third of three steps of step_module (the loss module, or it wrapped),
    the optimizer's parameter groups)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from cancernet.data.augment import Augment
    from cancernet.data.patch import PATCH_SIZE
    from cancernet.train.ema import ModelEma
    from cancernet.train.loop import DeviceSums, optimizer_step
    from cancernet.train.optim import LrSchedule

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    device = torch.device("cpu")
    optimizer = build_optimizer(cfg.optim, model, device)
    schedule = LrSchedule(optimizer, cfg.optim, cfg.optim.lr, 10**6, 0)
    scaler = torch.amp.GradScaler("cpu", enabled=cfg.train.amp == "fp16")
    ema = ModelEma(model, cfg.train.ema_decay, cfg.train.ema_warmup) if cfg.train.ema_decay else None
    augment, sums = Augment(cfg.data, cfg.train.seed, cfg.model.channels_last), DeviceSums(device)
    images = torch.randint(0, 256, (batch, PATCH_SIZE, PATCH_SIZE, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    labels, index = torch.randint(0, 2, (batch,)), torch.arange(batch)
    for step in range(3):
        phases = {name: Count() for name in ("augment", "model", "sums", "optimizer", "ema")}
        with phases["augment"]:
            inputs = augment(images, index, step)
        with phases["model"]:
            with autocast(device, cfg.train.amp):
                loss, correct = step_module(inputs, labels)
            scaler.scale(loss).backward()
        with phases["sums"]:
            sums.add(loss.detach(), correct.detach(), len(labels))
        schedule.step(step * batch, batch)
        with phases["optimizer"]:
            optimizer_step(optimizer, scaler, cfg.train.clip_grad)
        if ema is not None:
            with phases["ema"]:
                ema.update((step + 1) * batch)
    return {name: mode.n for name, mode in phases.items()}, len(optimizer.param_groups)
