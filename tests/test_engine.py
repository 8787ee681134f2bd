"""The training loop's pieces, on tiny models and batches (fast): accumulation, no host-device
syncs inside a step, mixed precision, samplers, the LR schedule, EMA."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from cancernet.config import Config, OptimConfig, TrainConfig
from cancernet.data.augment import dihedral, dihedral_views, sample_uniforms
from cancernet.data.datasets import EpochSampler, ShardSampler
from cancernet.runtime.distributed import DistInfo
from cancernet.train.ema import ModelEma
from cancernet.train.loop import StepParts, optimizer_step, train_one_epoch
from cancernet.train.optim import LrSchedule
from cancernet.train.patch_task import PatchTask


class Tiny(nn.Module):
    """No BatchNorm, no dropout: a step depends only on the data and the weights."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _batches(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    out, start = [], 0
    for size in sizes:
        out.append((images[start : start + size], labels[start : start + size], torch.arange(start, start + size)))
        start += size
    return out


def _parts(model, lr=0.1, scaler=None, cfg=None):
    """What a step touches: the patch task's loss module (of cfg's optim section) around model."""
    optimizer = torch.optim.SGD([{"params": list(model.parameters()), "lr_scale": 1.0}], lr=lr)
    schedule = LrSchedule(optimizer, OptimConfig(schedule="none"), lr, 10**6, 0)
    loss = PatchTask(cfg or Config(), DistInfo(), None, None, {}, None, "").loss_module(model)
    return StepParts(loss, optimizer, schedule, scaler or torch.amp.GradScaler("cpu", enabled=False))


class Unit:
    """The task of these tests: images scaled to [0, 1], labels as they come."""

    @staticmethod
    def inputs(batch, epoch):
        return batch[0].float() / 255, batch[1]


def _train(batches, accum):
    model = Tiny()
    parts = _parts(model)
    cfg = Config(train=TrainConfig(grad_accum=accum, log_every=0))
    stats = train_one_epoch(parts, batches, Unit, cfg, DistInfo(), 0, position=0)
    return model, parts, stats


def test_accumulating_two_batches_of_16_equals_one_batch_of_32():
    big, _, _ = _train(_batches([32, 32]), accum=1)
    small, _, _ = _train(_batches([16, 16, 16, 16]), accum=2)
    for a, b in zip(big.parameters(), small.parameters()):
        assert torch.allclose(a, b, atol=1e-4)  # float32 noise; a wrong loss scale moves them by ~1e-2


def test_the_last_short_window_of_an_epoch_is_closed_not_leaked():
    # 5 micro-batches with grad_accum 2: windows [0,1], [2,3], [4]; the last one is a whole step of its own
    model, parts, stats = _train(_batches([16] * 5), accum=2)
    reference, _, _ = _train(_batches([32, 32, 16]), accum=1)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-4)  # float32 noise; a wrong loss scale moves them by ~1e-2
    assert all(p.grad is None for p in model.parameters())  # nothing carried into the next epoch
    assert stats.position == parts.schedule.position + 16 == 80


class SyncRecorder(TorchFunctionMode):
    """Records every operation that makes the host wait for the device, with the step it ran in.

    Function level: .item(), .tolist(), .numpy(), bool()/float()/int() of a tensor, .cpu(), nonzero;
    dispatch level (_Dispatch): _local_scalar_dense, nonzero, is_nonzero.
    """

    FUNCTIONS = {"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "cpu", "nonzero"}

    def __init__(self, host: list | None = None):
        super().__init__()
        self.step, self.events = 0, []
        self.dispatch = _Dispatch(self)
        # tensors that never leave the host (the loader's index): reading them waits for nothing
        self.host = {id(t) for t in host or []}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.FUNCTIONS and not (args and id(args[0]) in self.host):
            self.events.append((self.step, func.__name__))
        return func(*args, **(kwargs or {}))

    def update(self, n=1):  # the progress-bar hook: one call per training step
        self.step += n


class _Dispatch(TorchDispatchMode):
    OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero"}

    def __init__(self, recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.OPS:
            self.recorder.events.append((self.recorder.step, func._schema.name))
        return func(*args, **(kwargs or {}))


def _packed_training(packed_root, tmp_path, *overrides):
    from cancernet.engine.rundir import RunDir
    from cancernet.train.state import build

    from conftest import make_cfg

    cfg = make_cfg(
        packed_root,
        tmp_path,
        "data.format=packed",
        "train.sync_every=3",
        "data.image_size=16",
        "data.stain=hed",
        "train.ema_decay=0.9",
        "train.clip_grad=1.0",
        *overrides,
    )
    return cfg, build(cfg, DistInfo(), RunDir(tmp_path))


def test_a_training_step_never_waits_for_the_device_between_sync_points(packed_root, tmp_path):
    # fp32 here: bf16 autocast only inserts casts (no syncs), and runs ~20x slower on this CPU;
    # tests/test_gpu.py runs bf16 and fp16 steps under torch.cuda.set_sync_debug_mode("error")
    cfg, training = _packed_training(packed_root, tmp_path)
    batches = list(training.task.train_loader)  # uint8 batches as the loader hands them over (host-only work)
    recorder = SyncRecorder(host=[index for _, _, index in batches])
    with recorder, recorder.dispatch:
        train_one_epoch(training.parts, batches, training.task, cfg, training.dist, 0, position=0, progress=recorder)
    steps = len(batches)
    # sync points: after optimizer steps 3, 6, ... (recorded before that step's progress update) and the epoch end
    expected = {k for k in range(steps) if (k + 1) % 3 == 0} | {steps}
    assert {step for step, _ in recorder.events} == expected, recorder.events


def test_the_sync_recorder_catches_a_nonzero_or_item_in_the_step(packed_root, tmp_path):
    cfg, training = _packed_training(packed_root, tmp_path, "train.sync_every=100")

    class Syncing:  # what the step did before: index a batch with nonzero()
        @staticmethod
        def inputs(batch, epoch):
            (batch[2] > 3).nonzero()
            float(batch[0].float().mean())
            return training.task.inputs(batch, epoch)

    batches = list(training.task.train_loader)
    recorder = SyncRecorder()
    with recorder, recorder.dispatch:
        train_one_epoch(training.parts, batches, Syncing, cfg, training.dist, 0, position=0, progress=recorder)
    names = {name for step, name in recorder.events if step == 0}
    assert {"nonzero", "aten::nonzero", "__float__", "aten::_local_scalar_dense"} <= names


def test_fp16_step_with_an_inf_gradient_is_skipped_and_lowers_the_scale():
    model = Tiny()
    parts = _parts(model, scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    before = [p.detach().clone() for p in model.parameters()]
    images, labels, _ = _batches([8])[0]
    hook = model.fc.weight.register_hook(lambda g: g * float("inf"))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.cross_entropy(model(images.float() / 255).float(), labels)
    parts.scaler.scale(loss).backward()
    optimizer_step(parts.optimizer, parts.scaler, None)
    hook.remove()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the step was skipped
    assert parts.scaler.get_scale() == 512.0


def test_bf16_autocast_on_cpu_learns():
    torch.manual_seed(0)
    labels = torch.randint(0, 2, (256,))
    images = (torch.randint(0, 128, (256, 3, 8, 8)) + 128 * labels.view(-1, 1, 1, 1)).to(torch.uint8)  # 1: bright
    batches = [(images[i : i + 32], labels[i : i + 32], torch.arange(i, i + 32)) for i in range(0, 256, 32)]
    model = Tiny()
    parts = _parts(model, lr=0.5)
    cfg = Config(train=TrainConfig(amp="bf16", log_every=0))
    stats = [train_one_epoch(parts, batches, Unit, cfg, DistInfo(), e, position=0) for e in range(15)]
    losses = [s.totals.train_loss for s in stats]
    assert losses[-1] < 0.6 * losses[0], losses


def test_clipping_sees_unscaled_gradients():
    model = Tiny()
    parts = _parts(model, lr=1.0, scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    images, labels = _batches([8])[0][:2]
    parts.scaler.scale(nn.functional.cross_entropy(model(images.float() / 255), labels)).backward()
    optimizer_step(parts.optimizer, parts.scaler, 1e-3)
    step = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    assert step.norm().item() == pytest.approx(1e-3, rel=1e-3)  # clipped to clip_grad, not to clip_grad / scale


def _epoch(sampler, epoch, offset=0):
    sampler.set_epoch(epoch, offset)
    return list(sampler)


def test_epoch_sampler_reshuffles_every_epoch_and_ranks_split_each_global_batch():
    ranks = [EpochSampler(103, r, 2, 8, seed=5) for r in range(2)]
    e0 = [_epoch(s, 0) for s in ranks]
    assert e0 == [_epoch(s, 0) for s in ranks]  # seeded
    assert e0 != [_epoch(s, 1) for s in ranks]  # set_epoch reshuffles
    assert len(e0[0]) == len(e0[1]) == len(ranks[0]) == 48  # 103 // 16 steps of 8 per rank; the tail dropped
    both = e0[0] + e0[1]
    assert len(set(both)) == 96 and set(both) <= set(range(103))


def test_a_mid_epoch_resume_with_another_world_size_continues_at_the_right_sample():
    order = torch.randperm(100, generator=torch.Generator().manual_seed(7 + 3)).tolist()
    before = [EpochSampler(100, r, 2, 4, seed=7) for r in range(2)]  # 2 ranks x 4: 8 samples per step
    seen = [i for s in before for i in _epoch(s, 3)[: 3 * 4]]  # stopped after 3 steps = 24 samples
    after = EpochSampler(100, 0, 1, 6, seed=7)  # resumed by one process with batch 6
    rest = _epoch(after, 3, offset=24)
    assert sorted(seen) == sorted(order[:24])
    assert rest == order[24 : 24 + (100 - 24) // 6 * 6]  # the same order, from sample 24 on
    assert not set(seen) & set(rest)


@pytest.mark.parametrize("n, world", [(5, 2), (7, 3), (2, 4)])
def test_shard_sampler_gives_each_sample_to_one_rank_without_padding(n, world):
    shards = [list(ShardSampler(n, r, world)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert [len(ShardSampler(n, r, world)) for r in range(world)] == [len(s) for s in shards]


def test_lr_schedule_is_a_function_of_samples_seen():
    def schedule(name, total, warmup=0):
        group = {"params": [nn.Parameter(torch.zeros(1))], "lr_scale": 0.5}
        return LrSchedule(torch.optim.SGD([group], lr=1.0), OptimConfig(schedule=name), 2.0, total, warmup)

    cosine = schedule("cosine", 1000, warmup=100)
    assert cosine.factor(0, 10) == pytest.approx(0.1)  # warm-up counts the step's own samples
    assert cosine.factor(100) == pytest.approx(1.0)
    assert cosine.factor(550) == pytest.approx(0.5)
    assert cosine.factor(1000) == pytest.approx(0.0)
    cosine.step(550, 10)
    assert cosine.optimizer.param_groups[0]["lr"] == pytest.approx(2.0 * 0.5 * 0.5)  # base x scale x factor
    # a longer run continues from the same position with a sensible lr instead of restarting or ending
    assert schedule("cosine", 2000, 100).factor(1000) > 0.4
    one = schedule("onecycle", 1000)
    assert one.factor(0) == pytest.approx(1 / 25) and one.factor(300) == pytest.approx(1.0)
    assert one.factor(1000) == pytest.approx(1 / 25e4)
    assert schedule("none", 1000).factor(999) == 1.0


def test_each_sample_gets_exactly_its_drawn_dihedral_view():
    x = torch.randint(0, 256, (16, 3, 6, 6), dtype=torch.uint8)
    k = torch.tensor([i % 8 for i in range(16)])
    out = dihedral(x, k)
    views = dihedral_views(x)
    for i in range(16):
        assert torch.equal(out[i], views[int(k[i])][i]), i
    assert len({v[3].numpy().tobytes() for v in views}) == 8  # the 8 views differ


def test_augmentation_draws_depend_on_the_image_not_on_its_batch():
    index = torch.arange(100, 164)
    a = sample_uniforms(index, seed=3, epoch=2)
    b = sample_uniforms(index[10:20], seed=3, epoch=2)  # another batch composition / world size
    assert torch.equal(a[10:20], b)
    assert not torch.equal(a, sample_uniforms(index, seed=3, epoch=3))
    assert not torch.equal(a, sample_uniforms(index, seed=4, epoch=2))
    many = sample_uniforms(torch.arange(20000), seed=0, epoch=0)
    assert many.min() >= 0 and many.max() < 1
    hist = torch.histc(many[:, 0], bins=10, min=0, max=1)
    assert (hist / 20000 - 0.1).abs().max() < 0.01  # close to uniform


def test_ema_follows_the_weights_and_copies_buffers():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEma(model, decay=0.5, warmup_samples=100)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(3.0)
    ema.update(40)  # 40 of 100 warm-up samples: decay 0.4 x 0.5
    d = 0.2
    assert ema.last_decay == pytest.approx(d)
    assert torch.allclose(ema.module[0].weight, d * start + (1 - d) * (start + 1))
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)
    state = ema.state_dict()
    other = ModelEma(model, decay=0.5, warmup_samples=100)
    other.load_state_dict(state)
    assert other.updates == 1 and torch.equal(other.module[0].weight, ema.module[0].weight)
    assert not math.isnan(float(ema.module[0].weight.sum()))


def test_ema_decay_reaches_the_configured_value_at_the_end_of_its_warmup_and_stays():
    ema = ModelEma(nn.Linear(2, 2), decay=0.999, warmup_samples=150_000)
    assert [ema.decay_at(s) for s in (0, 75_000, 150_000, 10**7)] == pytest.approx([0, 0.4995, 0.999, 0.999])
    assert ModelEma(nn.Linear(2, 2), decay=0.99).decay_at(1) == 0.99  # no warm-up: the decay from the start


def test_a_run_logs_the_ema_decay_it_reached_each_epoch(synth_root, tmp_path):
    import pandas as pd

    from conftest import train

    # 256 training samples per epoch (8 full batches): half the warm-up in epoch 1, all of it by epoch 2's end
    train(synth_root, tmp_path, "train.ema_decay=0.9", "train.ema_warmup=512", "data.limit=400")
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary["samples_seen"].tolist() == [256, 512]
    assert summary["ema_decay"].tolist() == pytest.approx([0.9 * 256 / 512, 0.9])
    off = tmp_path / "off"
    train(synth_root, off, "data.limit=64", "train.epochs=1")
    assert math.isnan(pd.read_csv(off / "summary.csv")["ema_decay"].iloc[0])


def test_ema_update_is_a_few_foreach_kernels_whatever_the_model_size():
    """One kernel per tensor (108 for ResNet34's parameters and buffers) costs launch time on a GPU."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torchvision.models import resnet18

    class Count(TorchDispatchMode):
        ops: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    model = resnet18()
    ema = ModelEma(model, decay=0.9)
    with torch.no_grad():
        model.fc.weight.add_(1.0)
        model.bn1.running_var.fill_(7.0)
    with Count() as count:
        ema.update(1000)
    assert len(count.ops) <= 4, count.ops  # resnet18 has 62 parameters and 60 buffers
    assert torch.equal(ema.module.bn1.running_var, model.bn1.running_var)
    assert not torch.equal(ema.module.fc.weight, model.fc.weight)


@pytest.mark.parametrize("channels_last", [False, True])
def test_preprocess_hands_the_model_the_memory_format_it_was_built_for(channels_last):
    """uint8 batches come NHWC-strided (the pack stores HWC rows); an NCHW model must get a
    contiguous NCHW input, or cuDNN converts its weights at every call."""
    from cancernet.data.augment import Preprocess

    nhwc_strided = torch.randint(0, 256, (4, 96, 96, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    for size in (96, 64):  # with and without the resize
        out = Preprocess(size, [0.5] * 3, [0.2] * 3, channels_last=channels_last)(nhwc_strided)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert out.shape == (4, 3, size, size) and out.is_contiguous(memory_format=fmt)


def test_label_smoothing_is_applied_to_the_training_loss():
    """optim.label_smoothing reaches the loss the loop optimises (lr 0: the loss of fixed weights)."""
    from cancernet.config import OptimConfig as Optim

    batches = _batches([16, 16])
    model = Tiny()
    images = torch.cat([b[0] for b in batches]).float() / 255
    labels = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        expected = {s: nn.functional.cross_entropy(model(images), labels, label_smoothing=s).item() for s in (0.0, 0.2)}
    for smoothing in (0.0, 0.2):
        cfg = Config(train=TrainConfig(log_every=0), optim=Optim(label_smoothing=smoothing))
        stats = train_one_epoch(_parts(model, lr=0.0, cfg=cfg), batches, Unit, cfg, DistInfo(), 0, position=0)
        assert stats.totals.train_loss == pytest.approx(expected[smoothing], rel=1e-5)
    assert expected[0.2] != pytest.approx(expected[0.0], rel=1e-3)


def test_tta_averages_the_probability_over_exactly_the_eight_dihedral_views():
    """Each view made here independently (numpy's rot90 and fliplr); the model is not invariant."""
    from cancernet.engine.predict import predict_scores

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 2)).eval()
    x = torch.randn(5, 3, 6, 6)
    arrays = x.numpy()
    views = [np.rot90(a, k, axes=(-2, -1)) for a in (arrays, arrays[..., ::-1]) for k in range(4)]
    with torch.no_grad():
        probs = [torch.sigmoid(model(torch.from_numpy(v.copy())).diff(dim=1)[:, 0]) for v in views]
        expected = torch.stack(probs).mean(0)
        prob, _ = predict_scores(model, x, tta=True)
        plain, _ = predict_scores(model, x, tta=False)
    assert torch.allclose(prob, expected, atol=1e-6)
    assert not torch.allclose(prob, plain, atol=1e-3)  # the views differ for this model


def test_the_lr_scales_with_the_global_batch_linearly_or_by_its_root_up_to_the_cap():
    from cancernet.train.optim import describe_lr, effective_lr

    base = OptimConfig(lr=5e-4, base_batch=256)
    for scale, expected in (("none", [5e-4] * 3), ("linear", [5e-4, 2e-3, 8e-3]), ("sqrt", [5e-4, 1e-3, 2e-3])):
        cfg = dataclasses.replace(base, lr_scale=scale)
        assert [effective_lr(cfg, b) for b in (256, 1024, 4096)] == pytest.approx(expected), scale
    capped = dataclasses.replace(base, lr_scale="linear", max_lr=2e-3)
    assert [effective_lr(capped, b) for b in (256, 2048)] == pytest.approx([5e-4, 2e-3])
    assert "capped at optim.max_lr 0.002" in describe_lr(capped, effective_lr(capped, 2048))
    assert "square root" in describe_lr(dataclasses.replace(base, lr_scale="sqrt"), 1e-3)
