"""Throughput benchmarks: the data path, the model's train step (the ceiling), the real loop, slides.

Each returns one JSON-able dict per measurement; `python -m cancernet bench` prints them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from cancernet.bench.common import context, one_process_group, peak_rss_mb, sync
from cancernet.bench.steps import bench_launch, bench_ops  # noqa: F401 (python -m cancernet bench ops | launch)
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
                sync(device)
                start, seen = time.perf_counter(), 0
            (images, labels), index = to_device(batch[:2], device), batch[2]
            if augmented:
                split.augment(images, index, 0)
            seen += len(labels)
        sync(device)
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
                **context(cfg, device),
                **(peak_rss_mb() if batches == 0 else {}),
            }
        )


def bench_step(cfg: Config, steps: int, warmup: int = 5, ddp: bool = False) -> dict:
    """Forward + backward + optimizer step on synthetic on-device batches: the loop's ceiling.

    ddp: inside a DDP wrapper (a one-process group), with torch.compile where model.compile_scope
    puts it: the cost of the wrapper and of the graph breaks, not of the all-reduce itself."""
    device = pick_device(cfg.train.device, 0)
    cfg = numerics.resolve(cfg, device)
    with one_process_group(device) if ddp else contextlib.nullcontext():
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
            sync(device)
            start = time.perf_counter()
        with autocast(device, cfg.train.amp):
            loss = F.cross_entropy(model(images).float(), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
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
        **context(cfg, device),
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
            sync(device)
            start = time.perf_counter()
            loader = _Limited(task.train_loader, n)
            stats = train_one_epoch(training.parts, loader, task, cfg, training.dist, epoch, position=0)
            sync(device)
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
            **context(cfg, device),
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
        **context(cfg, device),
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
        **context(cfg, device),
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
