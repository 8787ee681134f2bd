import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

from cancernet.config import load_config  # noqa: E402
from cancernet.data.synthetic import write_dataset  # noqa: E402
from cancernet.distributed import session  # noqa: E402
from cancernet.runner import run  # noqa: E402


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small synthetic dataset in the Kaggle layout, shared by the tests (read-only)."""
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, n_train=400, n_test=20, seed=1, workers=2)
    return root


def make_cfg(root, out, *overrides):
    return load_config(CONFIGS / "cpu_test.yaml",
                       [f"data.root={root}", f"train.out_dir={out}", *overrides])


def train(root, out, *overrides) -> str:
    """One in-process CPU training run (single process); returns 'done' or 'stopped'."""
    cfg = make_cfg(root, out, *overrides)
    with session("cpu") as dist:
        return run(cfg, dist)


def python_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(ROOT)
    return env
