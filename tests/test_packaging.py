"""`pip install .` (not editable) gives the whole package and a working `cancernet` command."""

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cancernet.wsi.synthetic import ellipse, write_slide

from conftest import ROOT, python_env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # from a copy of the sources alone: a build/ folder left by an earlier build would lend its files
    source = out / "source"
    local = {".git", ".venv", "build", "data", "runs", "cancernet.egg-info"}  # the checkout's own, at the top
    shutil.copytree(ROOT, source, ignore=lambda d, names: {n for n in names if Path(d) == ROOT and n in local})
    build = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(out),
        str(source),
    ]
    proc = subprocess.run(build, capture_output=True, text=True, env=python_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    (found,) = out.glob("cancernet-*.whl")
    return found


def test_the_wheel_holds_every_module_of_the_package(wheel):
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "cancernet").rglob("*.py")}
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
    packed = {n for n in names if n.endswith(".py")}
    assert source - packed == set()  # every module, every subpackage (cancernet/wsi was missing once)
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "cancernet" / "configs").glob("*.yaml")}
    assert "cancernet/configs/base.yaml" in shipped and shipped <= names  # `--config base` works
    static = {p.relative_to(ROOT).as_posix() for p in (ROOT / "cancernet" / "wsi" / "static").rglob("*") if p.is_file()}
    assert {"cancernet/wsi/static/openseadragon/openseadragon.min.js", "cancernet/wsi/static/viewer.js"} <= static
    assert "cancernet/wsi/static/openseadragon/LICENSE.txt" in static and static <= names  # `cancernet view` offline


@pytest.mark.slow
def test_an_installed_wheel_runs_from_outside_the_source_tree(wheel, synth_root, tmp_path):
    # a fresh venv without pip; the test environment's site-packages (not its editable cancernet,
    # whose hook a plain path entry does not run) supply the dependencies
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)]
    proc = subprocess.run(install, capture_output=True, text=True, env=python_env())
    assert proc.returncode == 0, proc.stderr[-2000:]

    away = tmp_path / "elsewhere"  # not the repository: nothing imports from the source tree
    away.mkdir()
    cancernet = str(venv / "bin" / "cancernet")
    where = subprocess.run(
        [python, "-c", "import cancernet.wsi.heatmap as m; print(m.__file__)"], cwd=away, capture_output=True, text=True
    )
    assert where.returncode == 0, where.stderr[-2000:]
    assert Path(where.stdout.strip()).is_relative_to(Path(site)), where.stdout
    helped = subprocess.run([cancernet, "--help"], cwd=away, capture_output=True, text=True)
    assert helped.returncode == 0 and "predict-slide" in helped.stdout, helped.stderr[-2000:]

    # the installed entry point trains from a shipped config named, not a path (none exists here)
    run = tmp_path / "run"
    overrides = [f"data.root={synth_root}", f"train.out_dir={run}", "train.epochs=1", "data.limit=128"]
    proc = subprocess.run([cancernet, "train", "--config", "cpu_test", *overrides], cwd=away, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    shape = (12, 16)
    tissue = ellipse(shape, (6, 8), (5, 7))
    slide = write_slide(away / "case.tif", tissue, ellipse(shape, (5, 6), (2, 3)) & tissue, seed=1)
    args = ["predict-slide", "--checkpoint", run / "checkpoints" / "best.pt", "--out", "maps", "--device", "cpu"]
    proc = subprocess.run([cancernet, *map(str, args), "--num-workers", "0", slide.name], cwd=away, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    heatmap = np.load(away / "maps" / "case" / "heatmap.npy")
    assert heatmap.shape == shape and np.isfinite(heatmap[tissue]).mean() > 0.8
    assert json.loads((away / "maps" / "case" / "slide.json").read_text())["grid"] == list(shape)
