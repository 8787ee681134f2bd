"""What one training step costs beside the model: its ops by phase (bench ops), and whether the
host keeps up with the device (bench launch)."""

from __future__ import annotations

import dataclasses

import torch

from cancernet.bench.common import context, one_process_group
from cancernet.config import Config
from cancernet.engine import numerics
from cancernet.engine.predict import autocast
from cancernet.models.classifier import build_for_weights
from cancernet.runtime.distributed import DistInfo
from cancernet.train.optim import build_optimizer


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
    with one_process_group(device):
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
        **context(cfg, device),
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


def bench_launch(cfg: Config, steps: int = 20) -> dict:
    """Host and device time of the shipped recipe's eager training step (augmentation, the loss
    module inside DDP (a one-process group), the optimizer, EMA) on the training device: the step
    is host-bound (launch-bound) when the host takes at least 80% of the device's time to issue it.

    Per step, on a GPU: the device first sleeps (torch.cuda._sleep) while the host issues the whole
    step behind it, timed on the host; events around the step then time its kernels alone, with no
    gap where the device waited for the host. On a CPU both are the step's wall time."""
    import tempfile
    import time

    from cancernet.engine.rundir import RunDir
    from cancernet.runtime.distributed import pick_device
    from cancernet.train.loop import DeviceSums, forward_backward, update
    from cancernet.train.state import build, wrap_for_training

    device = pick_device(cfg.train.device, 0)
    with tempfile.TemporaryDirectory() as tmp, one_process_group(device):
        cfg = dataclasses.replace(
            numerics.resolve(cfg, device),
            train=dataclasses.replace(cfg.train, out_dir=tmp, log_every=0, progress="off", grad_accum=1),
            data=dataclasses.replace(cfg.data, val_fraction=0.02, test_fraction=0.01),
        )
        training = build(cfg, DistInfo(device=device), RunDir(tmp))
        task, parts, dist = training.task, training.parts, training.dist
        parts.model = wrap_for_training(task.trained, cfg.model, dist, task.loss_module, ddp=True)
        task.sampler.set_epoch(0)
        batch = next(iter(task.train_loader))
        sums, n = DeviceSums(device), len(batch[1])
        cuda = device.type == "cuda"
        per_ms = _sleep_cycles_per_ms() if cuda else 0

        def step(i: int) -> None:
            inputs, labels = task.inputs(batch, 0)
            loss, correct = forward_backward(parts, inputs, labels, cfg.train.amp)
            sums.add(loss, correct, n)
            update(parts, i * n, n, cfg.train.clip_grad)

        for i in range(3):  # warm-up: autotuning, the allocator, DDP's first-step bucketing
            step(i)
        host, device_s, slept = [], [], 0.0
        for i in range(steps):
            if cuda:
                torch.cuda.synchronize(device)
                slept = 3 * max(host or [0.05])
                torch.cuda._sleep(int(slept * 1000 * per_ms))  # the device waits while the host issues
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            step(i)
            host.append(time.perf_counter() - t0)
            if cuda:
                end.record()
                torch.cuda.synchronize(device)
                device_s.append(start.elapsed_time(end) / 1000)
        host_ms = 1000 * sorted(host)[len(host) // 2]
        device_ms = 1000 * sorted(device_s)[len(device_s) // 2] if cuda else host_ms
    share = host_ms / max(device_ms, 1e-9)
    return {
        "bench": "launch",
        "arch": cfg.model.arch,
        "batch_size": cfg.train.batch_size,
        "ddp": True,
        "steps": steps,
        "host_ms": round(host_ms, 3),
        "device_ms": round(device_ms, 3),
        "host_share": round(share, 3),
        "verdict": ("host-bound" if share >= 0.8 else "device-bound") if cuda else "cpu: host and device are one",
        "images_per_s": round(n / max(device_ms, host_ms) * 1000, 1),
        **context(cfg, device),
    }


def _sleep_cycles_per_ms() -> float:
    """How many cycles torch.cuda._sleep spins per millisecond on this GPU (timed with events)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 10_000_000
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    torch.cuda.synchronize()
    return cycles / max(start.elapsed_time(end), 1e-6)
