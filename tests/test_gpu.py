"""CUDA-only behaviour; run by benchmarks/gpu_check.sh on a GPU machine (skipped without CUDA)."""
import json

import pandas as pd
import pytest
import torch

from cancernet.data.packed import prepare
from cancernet.config import DataConfig
from conftest import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_packed_training_with_amp(synth_root, tmp_path, amp):
    root = synth_root
    if not (root / "packed" / "manifest.json").is_file():
        prepare(DataConfig(root=str(root)), workers=2)
    out = tmp_path / amp
    train(root, out, "data.format=packed", f"train.amp={amp}", "train.device=cuda", "train.epochs=3",
          "data.image_size=64", "model.channels_last=true", "data.num_workers=2")
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["roc_auc"] > 0.9
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    assert state["scaler"]["scale"] > 0 if amp == "fp16" else True
    assert len(pd.read_csv(out / "summary.csv")) == 3


def test_compiled_model_keeps_clean_checkpoint_keys(synth_root, tmp_path):
    out = tmp_path / "compiled"
    train(synth_root, out, "train.device=cuda", "train.amp=bf16", "model.compile=true", "train.epochs=1",
          "data.limit=200")
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in state["model"])
