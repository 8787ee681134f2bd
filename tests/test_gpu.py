"""CUDA-only behaviour, run by benchmarks/gpu_check.sh on a GPU machine. Without CUDA these skip,
unless CANCERNET_REQUIRE_CUDA=1 (the GPU check sets it): then they fail. Each asserts that its
work ran on the GPU."""

import json
import warnings

import pandas as pd
import pytest
import torch
import yaml

from conftest import make_cfg, train

MODEL_BYTES = 40 * 2**20  # resnet18's weights alone are 45 MB: less at the peak means it never ran there


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_packed_training_with_amp(cuda, packed_root, tmp_path, amp):
    out = tmp_path / amp
    train(
        packed_root,
        out,
        "data.format=packed",
        f"train.amp={amp}",
        "train.device=cuda",
        "train.epochs=3",
        "data.image_size=64",
        "model.channels_last=true",
        "data.num_workers=2",
        "train.ema_decay=0.99",
    )
    assert torch.cuda.max_memory_allocated() > MODEL_BYTES  # trained on the GPU, not on the CPU
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["roc_auc"] > 0.9
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    assert state["scaler"]["scale"] > 0 if amp == "fp16" else not state["scaler"]
    assert "cuda" in state["rng"][0]  # this rank's own device RNG state
    assert len(pd.read_csv(out / "summary.csv")) == 3


def test_auto_precision_on_this_gpu_is_recorded(cuda, packed_root, tmp_path):
    from cancernet.engine.numerics import resolve_amp

    train(
        packed_root,
        tmp_path,
        "data.format=packed",
        "train.amp=auto",
        "train.device=cuda",
        "train.epochs=1",
        "data.limit=200",
    )
    expected = resolve_amp("auto", cuda)[0]
    assert expected == ("bf16" if torch.cuda.get_device_capability(cuda) >= (8, 0) else "fp16")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["amp"] == expected


def test_deterministic_gpu_runs_give_the_same_weights_bit_for_bit(cuda, packed_root, tmp_path):
    from cancernet.engine import numerics

    weights = []
    try:
        for name in ("a", "b"):
            train(
                packed_root,
                tmp_path / name,
                "data.format=packed",
                "train.device=cuda",
                "train.amp=bf16",
                "train.deterministic=true",
                "train.epochs=2",
                "data.image_size=64",
                "model.channels_last=true",
            )
            weights.append(
                torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")["model"]
            )
    finally:
        numerics.configure(False, cuda)
    assert torch.cuda.max_memory_allocated() > MODEL_BYTES
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_no_host_device_sync_inside_a_training_step(cuda, packed_root, tmp_path, amp):
    """Every synchronising CUDA call warns under sync debug mode; each must fall at a sync point."""
    from cancernet.engine.rundir import RunDir
    from cancernet.runtime.distributed import DistInfo
    from cancernet.train.loop import train_one_epoch
    from cancernet.train.state import build

    cfg = make_cfg(
        packed_root,
        tmp_path,
        "data.format=packed",
        "train.device=cuda",
        f"train.amp={amp}",
        "train.sync_every=4",
        "data.stain=hed",
        "train.ema_decay=0.99",
        "train.clip_grad=1.0",
        "model.channels_last=true",
    )
    training = build(cfg, DistInfo(device=cuda), RunDir(tmp_path))
    assert next(training.model_without_ddp.parameters()).is_cuda
    task = training.task
    batches = [tuple(x.pin_memory() for x in b) for b in task.train_loader]
    train_one_epoch(training.parts, batches[:2], task, cfg, training.dist, 0, position=0)  # warm-up
    torch.cuda.synchronize()
    tagger = _Tagger()
    with warnings.catch_warnings():  # restores warnings.showwarning on exit
        warnings.simplefilter("always")
        warnings.showwarning = tagger.record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_one_epoch(training.parts, batches, task, cfg, training.dist, 1, position=0, progress=tagger)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    steps = len(batches)
    expected = {k for k in range(steps) if (k + 1) % 4 == 0} | {steps}  # the sync points, as on CPU
    assert {step for step, _ in tagger.seen} <= expected, tagger.seen


class _Tagger:
    """The progress hook of train_one_epoch: attributes each sync warning to the step it came in."""

    def __init__(self):
        self.seen, self.step = [], 0

    def record(self, message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            self.seen.append((self.step, str(message)))

    def update(self, n=1):
        self.step += n


def test_compiled_model_keeps_clean_checkpoint_keys(cuda, synth_root, tmp_path):
    import torch._dynamo

    torch._dynamo.utils.counters.clear()
    out = tmp_path / "compiled"
    train(
        synth_root, out, "train.device=cuda", "train.amp=bf16", "model.compile=true", "train.epochs=1", "data.limit=200"
    )
    assert torch.cuda.max_memory_allocated() > MODEL_BYTES
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it really was compiled
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in state["model"])


def test_checkpoint_copies_from_the_gpu_land_before_training_goes_on(cuda):
    """The copies to pinned memory do not block; copy() must still return them complete."""
    from cancernet.engine.checkpoint import CheckpointWriter

    weight = torch.randn(4096, 4096, device="cuda")
    expected = weight.cpu()
    writer = CheckpointWriter()
    for _ in range(2):  # the second copy goes into the first one's pinned buffers
        copies = writer.copy({"last.pt": {"w": weight}})
        weight.add_(1)  # queued on the stream right behind the copy
        assert copies["last.pt"]["w"].is_pinned()
        assert torch.equal(copies["last.pt"]["w"], expected)
        expected = weight.cpu()


def test_slide_heatmap_on_cuda_matches_the_cpu(cuda, synth_root, tmp_path):
    import numpy as np
    from test_wsi import regions

    from cancernet.evaluate.metrics import roc_auc
    from cancernet.runtime.distributed import DistInfo
    from cancernet.wsi.heatmap import load_scorer
    from cancernet.wsi.synthetic import write_slide

    train(synth_root, tmp_path / "run", "train.epochs=3", "data.image_size=48")
    tissue, tumour = regions()
    slide = write_slide(tmp_path / "case.tif", tissue, tumour, seed=7)
    maps = {}
    for device, amp in (("cpu", "off"), ("cuda", "off"), ("cuda", "bf16")):
        dist = DistInfo(device=torch.device(device))
        scorer = load_scorer(tmp_path / "run" / "checkpoints" / "best.pt", dist, [], None, amp=amp, num_workers=2)
        out = tmp_path / f"{device}-{amp}"
        assert scorer.job(out).run(slide)["status"] == "done"
        maps[device, amp] = np.load(out / "case" / "heatmap.npy")
    assert torch.cuda.max_memory_allocated() > MODEL_BYTES  # scored on the GPU
    cpu = maps["cpu", "off"]
    assert np.allclose(maps["cuda", "off"], cpu, atol=2e-3, equal_nan=True)
    scored = np.isfinite(cpu)
    assert roc_auc(tumour[scored], maps["cuda", "bf16"][scored]) > 0.95
