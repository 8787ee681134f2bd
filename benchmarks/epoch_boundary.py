"""What an epoch pays outside its training loop, boundary after boundary, as the runner does it:
the blocking part of the checkpoint, validation's wait for the previous checkpoint's write, the
start of validation (its loader's first batch: workers started or woken), validation itself.

    python benchmarks/epoch_boundary.py DATA_ROOT [key=value ...]   (a prepared packed set)

Prints one JSON line per boundary; `fixed_s` = ckpt_s + wait_s + val_start_s.
"""

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

from cancernet.config import load_config
from cancernet.engine.rundir import RunDir
from cancernet.runtime.distributed import DistInfo
from cancernet.train.loop import EpochStats, EpochTotals
from cancernet.train.runner import validate_epoch
from cancernet.train.state import build

BOUNDARIES = 3


class FirstBatchTimed:
    """A loader whose passes record the seconds to their first batch."""

    def __init__(self, loader):
        self.loader, self.starts = loader, []

    def __iter__(self):
        start = time.perf_counter()
        batches = iter(self.loader)
        first = next(batches)
        self.starts.append(time.perf_counter() - start)
        yield first
        yield from batches


def main(root: str, overrides: list[str]) -> None:
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
                *overrides,
            ],
        )
        training = build(cfg, DistInfo(), RunDir(tmp))
        writer, loaders = training.checkpointer.writer, training.task.loaders
        for param in training.model_without_ddp.parameters():  # one step, so the optimizer holds its moments
            param.grad = param.detach() * 0 + 1e-3
        training.parts.optimizer.step()
        waits = []
        wait = writer.wait

        def timed_wait():
            start = time.perf_counter()
            wait()
            waits.append(time.perf_counter() - start)

        writer.wait = timed_wait  # the runner's wait before validation, timed (copy() waits too)
        timed = FirstBatchTimed(loaders["val"].loader)
        loaders["val"] = dataclasses.replace(loaders["val"], loader=timed)
        for boundary in range(BOUNDARIES):
            training.state.history.append({"ckpt_s": float("nan")})
            ckpt_s = training.checkpointer.save(training, last=True, best=True)
            waits.clear()
            row = validate_epoch(training, boundary, EpochStats(EpochTotals(), 1, 1.0, 0.0, 0))
            wait_s, val_start_s = sum(waits), timed.starts[-1]
            out = {
                "boundary": boundary + 1,
                "ckpt_s": round(ckpt_s, 3),
                "wait_s": round(wait_s, 3),
                "val_start_s": round(val_start_s, 3),
                "val_s": round(row.val_s - wait_s, 3),
                "val_images": len(timed.loader.dataset),
                "fixed_s": round(ckpt_s + wait_s + val_start_s, 3),
            }
            print(json.dumps(out), flush=True)
        writer.wait = wait
        wait()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
