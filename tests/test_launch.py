"""python -m cancernet.cli.launch: the preflight that checks a run once before torchrun spawns its ranks."""

import subprocess
import sys

import pytest

from cancernet.cli.launch import preflight

from conftest import ROOT, python_env


def launch(tmp_path, *overrides) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "cancernet.cli.launch", "--standalone", "--nproc_per_node=2", "--max-restarts=3"]
    command += ["train_ddp.py", "--config", "configs/cpu_test.yaml", f"train.out_dir={tmp_path / 'run'}", *overrides]
    env = {**python_env(), "TORCH_HOME": str(tmp_path / "empty-cache")}  # no weights cached here
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "overrides, says",
    [
        (
            ("model.pretrained=imagenet", "model.weights_url=file:///nowhere"),
            "cannot get ImageNet weights for resnet18",
        ),
        (("train.epochz=3",), "train.epochz"),
        (("model.pretrained=/no/such/weights.pt",), "/no/such/weights.pt does not exist"),
    ],
)
def test_a_run_that_cannot_start_is_one_line_and_exit_2_before_any_rank_starts(tmp_path, synth_root, overrides, says):
    proc = launch(tmp_path, f"data.root={synth_root}", *overrides)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()  # no traceback, no restarts, no worker's output
    assert line.startswith("cancernet.cli.launch: ") and says in line, line
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_the_preflight_passes_a_run_that_can_start_and_ignores_other_scripts(synth_root, tmp_path):
    args = ["--standalone", "--nproc_per_node=2", "train_ddp.py", "--config", "configs/cpu_test.yaml"]
    assert preflight([*args, f"data.root={synth_root}", f"train.out_dir={tmp_path}"]) is None
    assert preflight(["--nproc_per_node=2", "-m", "cancernet", "predict", "--checkpoint", "x.pt"]) is None
