"""benchmarks/gpu_check.sh, tiny on the CPU (SMOKE=1): every section runs and the summary is written,
so the script that a lent GPU's few minutes depend on works before it gets there, on a Python that,
like the bare GPU image, lacks pytest, tifffile and OpenSlide until the carried wheels bring them."""

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import ROOT, python_env

pytestmark = pytest.mark.slow
# what a bare GPU image lacks (packaging stays: matplotlib needs it)
ABSENT = ("pytest", "tifffile", "openslide", "iniconfig", "pluggy", "pygments")


def is_absent(name: str) -> bool:
    """A site-packages entry of those (module, package, or dist-info; pytest's _pytest and py.py too)."""
    return name.lstrip("_").lower().startswith(ABSENT) or name == "py.py"


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """A venv with this environment's packages, less those a bare GPU image lacks."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
        ).stdout.strip()
    )
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not is_absent(entry.name):
            (site / entry.name).symlink_to(entry)
    missing = subprocess.run([python, "-c", "import pytest"], capture_output=True)
    assert missing.returncode != 0  # the venv really lacks them
    return python


def test_a_package_neither_installed_nor_carried_is_one_line_and_exit_2(bare_python, tmp_path):
    empty = tmp_path / "wheels"
    empty.mkdir()
    proc = subprocess.run(
        [bare_python, "benchmarks/carried_wheels.py", "install", empty, tmp_path / "site"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "pytest" in line and "tifffile" in line and "openslide-python" in line and "download" in line


def test_gpu_check_smoke_runs_every_section_from_carried_wheels(bare_python, tmp_path):
    wheels = tmp_path / "wheels"  # for this Python, from the registry (as for the GPU image's)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    fetched = subprocess.run(
        [sys.executable, "benchmarks/carried_wheels.py", "download", wheels, "--python-version", version],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert fetched.returncode == 0, fetched.stderr[-2000:]
    out = tmp_path / "out"
    env = {**python_env(), "SMOKE": "1", "OUT": str(out), "DATA": str(tmp_path / "data"), "PYTHON": str(bare_python)}
    env.update(WHEELS=str(wheels), TMPDIR=str(tmp_path))
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800
    )
    log = (out / "log.txt").read_text()
    assert proc.returncode == 0 and "done" in log and "exit " not in log, log[-3000:] + proc.stderr[-2000:]
    (installed,) = [line for line in log.splitlines() if line.startswith("installed from carried wheels")]
    assert all(name in installed for name in ("pytest-", "tifffile-", "openslide_python-", "openslide_bin-"))
    rows = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    kinds = {(r["bench"], r.get("path"), bool(r.get("ddp")), r.get("compile_scope")) for r in rows}
    assert [r["bench"] for r in rows[:2]] == ["launch", "launch"]  # the most important rows first
    assert {
        ("step", None, False, None),
        ("train", "packed", False, None),
        ("boundary", "packed", False, None),
        ("train", "folder", False, None),
        ("data", "packed", False, None),
        ("data", "folder", False, None),
        ("step", None, True, "model"),
        ("step", None, True, "ddp"),
        ("slide", None, False, None),
    } <= kinds, kinds
    # each end-to-end row comes before its epoch boundary's (a time box ending in validation keeps it)
    order = [r["bench"] for r in rows if r["bench"] in ("train", "boundary")]
    assert order[::2] == ["train"] * (len(order) // 2) and order[1::2] == ["boundary"] * (len(order) // 2)
    summary = (out / "summary.txt").read_text()
    assert "% of the step ceiling" in summary and "/ seed-like" in summary and "tiles/s" in summary
    assert "epoch boundary" in summary and summary.startswith("launch resnet34")
    assert "test_gpu.py" in (out / "pytest.txt").read_text()  # the CUDA tests were collected, by carried pytest


@pytest.mark.parametrize("config", ["base", "pcam"])
def test_a_gpu_recipes_step_dispatches_few_ops_beside_the_model(config):
    """Each op is a kernel launch on a GPU (5-10 us of host time); at batch 256 a ResNet34 step
    is ~10 ms of device time, so augmentation, optimizer, EMA and bookkeeping must stay a small
    share of the model's ops (they were 42%, the augmentation alone 215 ops), and so must the
    DDP wrapper's own."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cancernet",
            "bench",
            "ops",
            "--config",
            f"configs/{config}.yaml",
            "train.amp=bf16",
            "--batch",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=python_env(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["model_ops"] > 500 and row["other_ops"] <= 0.10 * row["model_ops"], row
    assert row["augment_ops"] <= 40 and row["param_groups"] == 2, row
    # DDP adds what autograd's per-parameter gradients into its buckets cost (ResNet34: 110
    # parameters, a kernel and a view each) and the all-reduces: no per-forward broadcast of the
    # 108 BatchNorm buffers, no gradient copies in and out of the buckets (they were 772 ops)
    assert row["ddp_ops"] <= 2 * 110 + 10, row
