import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

from cancernet.config import load_config  # noqa: E402  (the package is installed: make setup)
from cancernet.data.synthetic import write_dataset  # noqa: E402
from cancernet.runtime.distributed import session  # noqa: E402
from cancernet.train.runner import run  # noqa: E402


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small synthetic dataset in the Kaggle layout, shared by the tests (read-only)."""
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, n_train=400, n_test=20, seed=1, workers=2)
    return root


def make_cfg(root, out, *overrides):
    return load_config(CONFIGS / "cpu_test.yaml", [f"data.root={root}", f"train.out_dir={out}", *overrides])


def train(root, out, *overrides) -> str:
    """One in-process training run (single process, on train.device); returns 'done' or 'stopped'."""
    cfg = make_cfg(root, out, *overrides)
    with session(cfg.train.device) as dist:
        return run(cfg, dist)


@pytest.fixture
def cuda():
    """Skip without a CUDA device, unless CANCERNET_REQUIRE_CUDA=1 (the GPU check): then fail."""
    import torch

    if not torch.cuda.is_available():
        if os.environ.get("CANCERNET_REQUIRE_CUDA") == "1":
            pytest.fail("CANCERNET_REQUIRE_CUDA=1 but torch sees no CUDA device")
        pytest.skip("needs a CUDA device")
    torch.cuda.reset_peak_memory_stats()
    return torch.device("cuda", 0)


def assert_same_run(a: Path, b: Path, epochs=(1, 2, 3, 4)) -> None:
    """Runs a and b have the same summary (to 1e-4) and the same final weights and EMA (to 1e-5)."""
    import pandas as pd
    import torch

    sa, sb = pd.read_csv(a / "summary.csv"), pd.read_csv(b / "summary.csv")
    assert sa["epoch"].tolist() == sb["epoch"].tolist() == list(epochs)
    for col in ("train_loss", "train_acc", "val_loss", "val_auc", "lr", "samples_seen"):
        assert sa[col].to_numpy() == pytest.approx(sb[col].to_numpy(), abs=1e-4), col
    la, lb = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (a, b))
    for wa, wb in ((la["model"], lb["model"]), (la["ema"]["model"], lb["ema"]["model"])):
        assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-5) for k in wa)


# dropout (seed head), EMA and accumulation windows (the last one of each epoch short) all take
# part, so a resume that loses RNG, EMA or window state cannot match the uninterrupted run
RESUME_COMMON = (
    "data.limit=240",
    "train.seed=3",
    "train.epochs=4",
    "train.sync_every=1",
    "model.head=seed",
    "train.ema_decay=0.9",
    "train.ema_warmup=300",  # the decay still ramping when a resume comes
    "train.grad_accum=2",
)


class StopAfterSyncs:
    """A stop request that turns on at the n-th look: the loop reads `requested` at every sync point
    (each optimizer step with train.sync_every=1) and once at each epoch's end, as after a signal."""

    def __init__(self, n: int):
        self.n, self.reads = n, 0

    @property
    def requested(self) -> bool:
        self.reads += 1
        return self.reads >= self.n

    @requested.setter
    def requested(self, value: bool) -> None:  # a signal arriving as well
        self.n = 0 if value else self.n


def train_stopping(root, out, after_epochs=None, after_syncs=None, overrides=RESUME_COMMON) -> str:
    """Train until a stop request after some epochs (run's epoch-end hook) or looks at the request."""
    from cancernet.runtime.signals import StopFlag

    stop = StopAfterSyncs(after_syncs) if after_syncs else StopFlag()

    def stop_after(t, row):
        if after_epochs is not None and row["epoch"] >= after_epochs:
            stop.requested = True

    with session("cpu") as dist:
        return run(make_cfg(root, out, *overrides), dist, stop, stop_after)


def python_env() -> dict:
    """The environment for a subprocess: no torchrun variables leaking in."""
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}


def copy_dataset(src: Path, dest: Path, n: int | None = None) -> Path:
    """A private copy of the first n labelled images of a Kaggle-layout dataset."""
    import shutil

    import pandas as pd

    labels = pd.read_csv(src / "train_labels.csv", dtype={"id": str})
    labels = labels.head(n) if n else labels
    (dest / "train").mkdir(parents=True)
    for i in labels["id"]:
        shutil.copy(src / "train" / f"{i}.tif", dest / "train")
    labels.to_csv(dest / "train_labels.csv", index=False)
    return dest


@pytest.fixture(scope="session")
def packed_root(synth_root, tmp_path_factory) -> Path:
    """synth_root's images, also packed (data.format=packed)."""
    from cancernet.config import DataConfig
    from cancernet.data.formats import prepare

    root = copy_dataset(synth_root, tmp_path_factory.mktemp("packed_root"))
    prepare(DataConfig(root=str(root)), workers=2)
    return root
