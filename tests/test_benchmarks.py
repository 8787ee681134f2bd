"""benchmarks/gpu_check.sh, tiny on the CPU (SMOKE=1): every section runs and the summary is written,
so the script that a lent GPU's few minutes depend on works before it gets there."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, python_env

pytestmark = pytest.mark.slow


def test_gpu_check_smoke_runs_every_section_and_writes_the_summary(tmp_path):
    out = tmp_path / "out"
    env = {**python_env(), "SMOKE": "1", "OUT": str(out), "DATA": str(tmp_path / "data"), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400
    )
    log = (out / "log.txt").read_text()
    assert proc.returncode == 0 and "done" in log and "exit " not in log, log[-3000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    kinds = {(r["bench"], r.get("path"), bool(r.get("ddp")), r.get("compile_scope")) for r in rows}
    assert {
        ("step", None, False, None),
        ("train", "packed", False, None),
        ("train", "folder", False, None),
        ("data", "packed", False, None),
        ("data", "folder", False, None),
        ("step", None, True, "model"),
        ("step", None, True, "ddp"),
        ("slide", None, False, None),
    } <= kinds, kinds
    summary = (out / "summary.txt").read_text()
    assert "% of the step ceiling" in summary and "/ seed-like" in summary and "tiles/s" in summary
    assert "test_gpu.py" in (out / "pytest.txt").read_text()  # the CUDA tests were collected
