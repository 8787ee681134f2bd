"""Epoch-boundary costs: blocking part of checkpointing, the background write, validation, the
next epoch's first batch.   python benchmarks/epoch_boundary.py DATA_ROOT   (a prepared packed set)"""

import json
import sys
import tempfile
import time
from pathlib import Path

from cancernet.config import load_config
from cancernet.data.loaders import set_epoch
from cancernet.distributed import DistInfo
from cancernet.engine import EpochStats, EpochTotals
from cancernet.rundir import RunDir
from cancernet.runner import save_checkpoints, validate_epoch
from cancernet.training import build

root = sys.argv[1]
with tempfile.TemporaryDirectory() as tmp:
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "base.yaml",
        [
            f"data.root={root}",
            "model.pretrained=none",
            "model.arch=resnet18",
            "train.device=cpu",
            "train.amp=off",
            "data.num_workers=2",
            f"train.out_dir={tmp}",
            "train.batch_size=128",
        ],
    )
    t = build(cfg, DistInfo(), RunDir(tmp))
    split = t.loaders["train"]
    for param in t.model_without_ddp.parameters():  # one step, so the optimizer holds its moments as in training
        param.grad = param.detach() * 0 + 1e-3
    t.parts.optimizer.step()
    out = {"code": "after"}
    for epoch in range(2):
        set_epoch(split, epoch)
        start = time.perf_counter()
        it = iter(split.loader)
        next(it)
        out[f"first_batch_s_epoch{epoch + 1}"] = round(time.perf_counter() - start, 3)
        del it
    t.state.history.append({"ckpt_s": float("nan")})
    start = time.perf_counter()
    save_checkpoints(t, best=True)
    out["ckpt_s"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    t.writer.wait()
    out["ckpt_background_write_s"] = round(time.perf_counter() - start, 3)
    t.state.history.append({"ckpt_s": float("nan")})  # the next epoch's: copies into the first one's buffers
    start = time.perf_counter()
    save_checkpoints(t, best=True)
    out["ckpt_s_next_epoch"] = round(time.perf_counter() - start, 3)
    t.writer.wait()
    row = validate_epoch(t, 0, EpochStats(EpochTotals(), 1, 1.0, 0.0, 0))
    out["val_s"] = round(row.val_s, 3)
    out["val_images"] = len(t.loaders["val"].ids)
    print(json.dumps(out))
