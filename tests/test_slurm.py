"""slurm/*.sbatch on a real two-node Slurm cluster that the fixture starts on this machine (root,
slurm-wlm, munge).

Skipped where Slurm cannot run, unless CANCERNET_REQUIRE_SLURM=1 (set by .ci/run): then a
missing cluster is a failure.
"""

import os
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT
from slurm_cluster import Cluster, available

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = available()
    if why:
        if os.environ.get("CANCERNET_REQUIRE_SLURM") == "1":
            pytest.fail(f"Slurm is required here (CANCERNET_REQUIRE_SLURM=1) but {why}")
        pytest.skip(why)
    c = Cluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


def sbatch(
    cluster, tmp_path, script, *args, sbatch_args=(), nproc=2, env=None, config=ROOT / "configs" / "cpu_test.yaml"
):
    """Submit from a scratch folder with this checkout's Python first on PATH; returns the job id.
    config: the script's first argument (None: args are all)."""
    env = {
        "NPROC_PER_NODE": str(nproc),
        "CANCERNET_HOME": str(ROOT),
        "RUN_DIR": str(tmp_path / "run"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "WANDB_MODE": "disabled",
        **(env or {}),
    }
    out = cluster.run(
        "sbatch",
        "--parsable",
        "--gres=none",
        "--cpus-per-task=1",  # the scripts ask for what a GPU node has; this cluster's nodes have 2 cores
        "--mem=0",
        f"--output={tmp_path}/%j.out",
        *sbatch_args,
        str(ROOT / "slurm" / script),
        *([str(config)] if config else []),
        *args,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def log_of(tmp_path, job_id):
    return (tmp_path / f"{job_id}.out").read_text()


def preempt_after_epochs(cluster, tmp_path, job, epochs: int, how=("--full", "--signal=TERM")) -> Path:
    """A stop signal once the job's summary has `epochs` rows (default: TERM to every process of
    the job, as a preemption); returns once the job has ended that attempt and requeued itself.
    The run's summary.csv path."""
    summary = tmp_path / "run" / "summary.csv"
    deadline = time.time() + 240
    while not summary.is_file() or len(pd.read_csv(summary)) < epochs:
        running = cluster.job(job)["JobState"] in ("PENDING", "RUNNING")
        assert time.time() < deadline and running, log_of(tmp_path, job)[-3000:]
        time.sleep(0.2)
    assert cluster.run("scancel", *how, job).returncode == 0
    while int(cluster.job(job).get("Restarts", 0)) < 1:
        assert time.time() < deadline + 120, log_of(tmp_path, job)[-3000:]
        time.sleep(0.2)
    return summary


def test_train_sbatch_writes_the_full_run_directory(cluster, synth_root, tmp_path):
    job = sbatch(
        cluster,
        tmp_path,
        "train.sbatch",
        f"data.root={synth_root}",
        "data.limit=200",
        "train.epochs=2",
        "report.figures=true",
    )
    info = cluster.wait(job, timeout=300)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log_of(tmp_path, job)[-3000:]
    run = tmp_path / "run"
    for name in (
        "config.yaml",
        "summary.csv",
        "splits.csv",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "predictions/test.csv",
        "report/metrics.json",
        "report/roc.png",
        "report/index.html",
    ):
        assert (run / name).is_file(), name
    assert "world_size: 2" in (run / "config.yaml").read_text()
    assert pd.read_csv(run / "summary.csv")["epoch"].tolist() == [1, 2]
    assert "1 node(s) x 2 process(es)" in log_of(tmp_path, job)


def test_preemption_with_loader_workers_checkpoints_requeues_and_resumes(cluster, synth_root, tmp_path):
    """TERM to every process of the job, loader workers included (what preemption does); the batch
    script forwards it once more. Every rank checkpoints, the job requeues itself and resumes."""
    job = sbatch(
        cluster,
        tmp_path,
        "train.sbatch",
        f"data.root={synth_root}",
        "data.limit=300",
        "train.epochs=4",
        "data.num_workers=2",
        "train.batch_size=8",
        "train.sync_every=2",
    )
    summary = preempt_after_epochs(cluster, tmp_path, job, 2)
    # a requeued job becomes eligible after the credential lifetime (cred_expire: 10 s here,
    # 120 s by default), then starts by itself
    info = cluster.wait(job, timeout=300)
    log = log_of(tmp_path, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert int(info["Restarts"]) >= 1
    assert "killed by signal" not in log and "Traceback" not in log, log[-3000:]
    assert "[rank0] WARNING stopped in epoch 3 after" in log and "[rank1] WARNING stopped in epoch 3 after" in log
    assert "requeueing job" in log and "resumed from" in log and "(restart 1)" in log
    assert pd.read_csv(summary)["epoch"].tolist() == [1, 2, 3, 4]  # each epoch exactly once
    assert (tmp_path / "run" / "report" / "metrics.json").is_file()


def test_a_two_node_job_stops_with_a_whole_checkpoint_requeues_and_resumes(cluster, synth_root, tmp_path):
    """multinode.sbatch over two nodes, one rank each: srun starts a launcher per node, they meet
    in a rendezvous; then the time-limit warning (USR1 to the batch script, --signal=B:USR1@120).
    Rank 1 has nothing to write, but must not leave (its launcher's exit would let srun
    --kill-on-bad-exit kill rank 0 in the middle of last.pt)."""
    import torch

    job = sbatch(
        cluster,
        tmp_path,
        "multinode.sbatch",
        f"data.root={synth_root}",
        "data.limit=300",
        "train.epochs=3",
        "train.batch_size=8",
        "train.sync_every=2",
        sbatch_args=("--nodes=2",),
        nproc=1,
    )
    summary = preempt_after_epochs(cluster, tmp_path, job, 1, how=("--batch", "--signal=USR1"))
    # between the stop and the requeued start (10 s of credential lifetime): the stop's checkpoint
    stopped = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    log = log_of(tmp_path, job)
    assert "[rank0] WARNING stop" in log and "[rank1] WARNING stop" in log, log[-3000:]
    assert stopped["run_state"]["mid_epoch"] is not None or stopped["epoch"] >= 1
    info = cluster.wait(job, timeout=300)
    log = log_of(tmp_path, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert "2 node(s) x 1 process(es)" in log and "(restart 1)" in log and "resumed from" in log
    assert "Killed" not in log and "Traceback" not in log, log[-3000:]
    assert "world_size: 2" in (tmp_path / "run" / "config.yaml").read_text()
    assert pd.read_csv(summary)["epoch"].tolist() == [1, 2, 3]  # each epoch exactly once
    assert (tmp_path / "run" / "report" / "metrics.json").is_file()


def test_an_array_of_folds_runs_one_resumable_run_per_task_and_aggregates(cluster, synth_root, tmp_path):
    """3 tasks = 3 folds x 1 seed, one process each; then one report over them."""
    from cancernet.evaluate.aggregate import aggregate

    env_extra = {"FOLDS": "3", "SEEDS": "4"}
    job = sbatch(
        cluster,
        tmp_path,
        "array.sbatch",
        f"data.root={synth_root}",
        "data.limit=120",
        "train.epochs=1",
        sbatch_args=("--array=0-2",),
        nproc=1,
        env=env_extra,
    )
    deadline = time.time() + 300
    runs = [tmp_path / "run" / f"fold{f}-seed4" for f in range(3)]
    while not all((r / "report" / "metrics.json").is_file() for r in runs):
        states = cluster.run("squeue", "-h", "-j", job, "-o", "%T").stdout.split()
        assert time.time() < deadline and (states or all((r / "report" / "metrics.json").is_file() for r in runs)), [
            p.read_text()[-2000:] for p in tmp_path.glob("*.out")
        ]
        time.sleep(0.5)
    folds = [pd.read_csv(r / "splits.csv", dtype={"id": str}) for r in runs]
    assert all(f["fold"].max() == 2 for f in folds)
    vals = [set(f.loc[f["split"] == "val", "id"]) for f in folds]
    assert not (vals[0] & vals[1]) and not (vals[1] & vals[2])  # each task validated on its own fold
    summary = aggregate(runs, tmp_path / "aggregate")
    assert summary["runs"] == 3 and summary["validation"]["kind"].startswith("out-of-fold")


def test_an_extraction_array_splits_the_slides_over_its_tasks_and_a_resubmission_skips_them(cluster, tmp_path):
    """slurm/extract.sbatch as a 2-task array over 5 slides: task 0 takes slides 0, 2, 4, task 1
    slides 1, 3; the same array submitted again finds every file done."""
    from cancernet.wsi.synthetic import write_slide_set

    write_slide_set(tmp_path / "set", 5, rows=12, cols=16, seed=0)
    feats = tmp_path / "feats"
    args = (tmp_path / "set" / "slides", "--out", feats, "--arch", "resnet18", "model.pretrained=none")
    parts = [feats / f"slides.{k}-of-2.csv" for k in range(2)]
    for attempt in range(2):
        for p in parts:
            p.unlink(missing_ok=True)
        job = sbatch(
            cluster,
            tmp_path,
            "extract.sbatch",
            *map(str, args),
            "--device",
            "cpu",
            "--num-workers",
            "0",
            sbatch_args=("--array=0-1", f"--output={tmp_path}/%A_%a.out"),
            nproc=1,
            config=None,
        )
        deadline = time.time() + 240
        while cluster.run("squeue", "-h", "-j", job, "-o", "%T").stdout.split():
            assert time.time() < deadline, [p.read_text()[-2000:] for p in tmp_path.glob("*.out")]
            time.sleep(0.5)
        logs = [p.read_text()[-2000:] for p in tmp_path.glob(f"{job}_*.out")]
        assert all(p.is_file() for p in parts), logs
        listed = [pd.read_csv(p) for p in parts]
        assert [sorted(f["slide"]) for f in listed] == [
            ["slide_000", "slide_002", "slide_004"],
            ["slide_001", "slide_003"],
        ]
        assert {s for f in listed for s in f["status"]} == ({"done"} if attempt == 0 else {"skipped"}), logs
    assert sorted(p.stem for p in feats.glob("*.h5")) == [f"slide_{i:03d}" for i in range(5)]


SBATCH = sorted((ROOT / "slurm").glob("*.sbatch"))


@pytest.mark.parametrize("script", SBATCH, ids=[s.name for s in SBATCH])
def test_a_job_that_asks_for_gpus_asks_for_the_cores_and_memory_its_run_uses(script):
    """A job given --gres=gpu and nothing else gets one core and the default memory per core at
    most sites: loader workers starved, or the job killed for memory (and not requeued)."""
    options = [line.split(None, 1)[1].strip() for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    if not any(o.startswith("--gres=gpu") for o in options):
        return
    whole_node = "--exclusive" in options and "--mem=0" in options
    cores = any(o.startswith(("--cpus-per-task=", "--cpus-per-gpu=")) for o in options)
    memory = any(o.startswith(("--mem=", "--mem-per-cpu=", "--mem-per-gpu=")) for o in options)
    assert whole_node or (cores and memory), (script.name, options)


@pytest.mark.parametrize("script", [*SBATCH, *(ROOT / "slurm").glob("*.sh")], ids=lambda p: p.name)
def test_arrays_that_may_be_empty_expand_safely_under_set_u_in_old_bash(script):
    """bash before 4.4 (RHEL 7's 4.2) calls an empty "${A[@]}" an unbound variable under set -u:
    an array that can be empty (made empty, or from the command line's arguments) must expand as
    ${A[@]+"${A[@]}"}."""
    import re

    text = script.read_text()
    may_be_empty = set(re.findall(r"\b(\w+)=\((?:\)|\"\$@\"\))", text))
    for name in may_be_empty:
        bare = re.findall(rf'(?<!\+)"\$\{{{name}\[@\]\}}"', text)
        assert not bare, f'{script.name}: "${{{name}[@]}}" may be empty: write ${{{name}[@]+"${{{name}[@]}}"}}'
