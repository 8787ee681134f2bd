"""extract-features: slides to one feature file per slide (the input of slide-level MIL models)."""

import dataclasses
import json
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from test_wsi import run_cli

from cancernet.wsi.synthetic import ellipse, write_slide, write_slide_set

from conftest import ROOT, python_env

BACKBONE = ("--arch", "resnet18", "model.pretrained=none", "--num-workers", "2", "--batch-size", "64")


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract_slides")
    write_slide_set(root, 3, rows=12, cols=16, seed=0)
    return root / "slides"


def extract(capsys, monkeypatch, slides, out, *args):
    return run_cli(capsys, monkeypatch, "extract-features", slides, "--out", out, "--device", "cpu", *BACKBONE, *args)


def test_each_slide_gets_the_backbones_features_of_its_tissue_tiles_at_their_level0_corners(
    slides, tmp_path, capsys, monkeypatch
):
    import openslide

    from cancernet.config import load_config
    from cancernet.data.augment import Preprocess
    from cancernet.models.classifier import build_model, embed, resolve_preprocessing

    # tiles read at the slides' own 0.486 um/px: each is the level-0 region at its coords, unresized
    code, log, err = extract(capsys, monkeypatch, slides, tmp_path / "f", "--tile-mpp", "0.486")
    assert code == 0, err
    listed = pd.read_csv(tmp_path / "f" / "slides.csv")
    assert listed["status"].tolist() == ["done"] * 3 and (listed["tiles"] > 20).all()
    cfg, _ = resolve_preprocessing(load_config("base", ["model.arch=resnet18", "model.pretrained=none"]))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.image_size).eval()
    preprocess = Preprocess.from_config(cfg.data)
    with h5py.File(tmp_path / "f" / "slide_001.h5") as f:
        features, coords = f["features"][:], f["coords"][:]
        settings = json.loads(f.attrs["settings"])
    assert features.dtype == np.float16 and features.shape == (listed["tiles"][1], 512) and coords.shape[1] == 2
    assert settings["tile"] == 96 and settings["stride"] == 96 and settings["tile_mpp"] == 0.486
    assert len({tuple(c) for c in coords}) == len(coords) and (np.diff(np.unique(coords[:, 0])) % 96 == 0).all()
    slide = openslide.OpenSlide(str(slides / "slide_001.tif"))
    pick = [0, len(coords) // 2, len(coords) - 1]
    tiles = np.stack([np.asarray(slide.read_region(tuple(map(int, coords[i])), 0, (96, 96)))[..., :3] for i in pick])
    with torch.no_grad():
        expected = embed(model, preprocess(torch.from_numpy(tiles).permute(0, 3, 1, 2))).numpy()
    assert np.allclose(features[pick].astype(np.float32), expected, rtol=2e-2, atol=2e-2)


def test_torchrun_deals_the_slides_out_and_gives_the_same_files_and_a_rerun_skips_them(
    slides, tmp_path, capsys, monkeypatch
):
    code, _, err = extract(capsys, monkeypatch, slides, tmp_path / "one")
    assert code == 0, err
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [
            *launcher,
            "-m",
            "cancernet",
            "extract-features",
            slides,
            "--out",
            tmp_path / "two",
            "--device",
            "cpu",
            *BACKBONE,
        ],
        cwd=ROOT,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("slide_000", "slide_001", "slide_002"):
        with h5py.File(tmp_path / "one" / f"{name}.h5") as a, h5py.File(tmp_path / "two" / f"{name}.h5") as b:
            assert np.array_equal(a["features"][:], b["features"][:]) and np.array_equal(a["coords"][:], b["coords"][:])
    assert (pd.read_csv(tmp_path / "two" / "slides.csv")["status"] == "done").all()
    # a stopped run continues: files with the same settings are kept, others made again
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "one").glob("*.h5")}
    (tmp_path / "one" / "slide_002.h5").unlink()
    code, log, _ = extract(capsys, monkeypatch, slides, tmp_path / "one")
    assert code == 0 and log.count("done before, skipped") == 2
    listed = pd.read_csv(tmp_path / "one" / "slides.csv").set_index("slide")
    assert listed["status"].to_dict() == {"slide_000": "skipped", "slide_001": "skipped", "slide_002": "done"}
    assert (listed["tiles"] > 0).all()
    assert all((tmp_path / "one" / n).stat().st_mtime_ns == t for n, t in stamps.items() if n != "slide_002.h5")
    code, log, _ = extract(capsys, monkeypatch, slides, tmp_path / "one", "--tile-mpp", "0.6")
    assert code == 0 and "done before, skipped" not in log  # another resolution: every slide again


def test_bad_slides_cost_one_line_each_and_the_others_are_extracted(tmp_path, capsys, monkeypatch):
    rows, cols = 12, 16
    tissue = ellipse((rows, cols), (6, 8), (5, 7))
    folder = tmp_path / "slides"
    good = write_slide(folder / "good.tif", tissue, np.zeros_like(tissue), seed=1)
    data = good.read_bytes()
    (folder / "truncated.tif").write_bytes(data[: len(data) // 2])
    write_slide(folder / "glass.tif", np.zeros_like(tissue), np.zeros_like(tissue))
    write_slide(folder / "nompp.tif", tissue, np.zeros_like(tissue), seed=2, resolution=False)
    code, log, err = extract(capsys, monkeypatch, folder, tmp_path / "f")
    assert code == 1 and "3 of 4 slides failed" in err
    errors = [line for line in log.splitlines() if " ERROR " in line]
    for name, why in (("truncated.tif", "cannot open"), ("glass.tif", "no tissue"), ("nompp.tif", "pass --mpp")):
        assert sum(name in line and why in line for line in errors) == 1, (name, errors)
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["good.h5", "slides.csv"]  # nothing half-written
    code, _, _ = extract(capsys, monkeypatch, folder / "nompp.tif", tmp_path / "f", "--mpp", "0.486")
    assert code == 0 and (tmp_path / "f" / "nompp.h5").is_file()


def test_one_of_arch_or_checkpoint_is_needed(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(capsys, monkeypatch, "extract-features", tmp_path, "--out", tmp_path / "f")
    assert code == 2 and "one of --arch" in err


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_memory_does_not_grow_with_the_number_of_slides(slides, tmp_path):
    """200 slides in one process: what the first 40 leave in memory, the next 160 do not add to."""
    from cancernet.config import SlideConfig, load_config
    from cancernet.runtime.distributed import DistInfo
    from cancernet.wsi.extract import Reading, extract_features, load_encoder

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(200):
        shutil.copy(slides / "slide_000.tif", folder / f"s{i:03d}.tif")
    paths = sorted(folder.iterdir())
    dist = DistInfo()
    cfg = load_config("base", ["model.arch=mobilenet_v3_small", "model.pretrained=none", "data.image_size=32"])
    encoder = load_encoder(dist, cfg=cfg, tile_mpp=2.0, tile=32)  # ~50 tiles a slide: the memory, not the model
    tissue = SlideConfig(stride=32)
    extract_features(encoder, paths[:40], tmp_path / "f", dist, Reading(tissue, batch_size=64, num_workers=0))
    before = rss_mb()
    rows = extract_features(encoder, paths, tmp_path / "f", dist, Reading(tissue, batch_size=64, num_workers=0))
    assert [r["status"] for r in rows].count("done") == 160
    # measured here: 0.4 MB; keeping each slide's features (~9 MB for these 160) would fail it
    assert rss_mb() - before < 5, (before, rss_mb())


def test_a_trained_checkpoints_backbone_reads_96_px_tiles_at_its_training_resolution(
    slides, tmp_path, capsys, monkeypatch
):
    from cancernet.config import Config
    from cancernet.engine import checkpoint
    from cancernet.models.classifier import build_for_weights
    from cancernet.runtime.distributed import DistInfo
    from cancernet.wsi.extract import load_encoder

    cfg = Config()
    cfg.model.arch, cfg.data.image_size, cfg.data.mpp = "resnet18", 48, 0.972
    path = tmp_path / "best.pt"
    checkpoint.save(path, {"model": build_for_weights(cfg).state_dict(), "config": cfg.to_dict()})
    code, _, err = run_cli(
        capsys,
        monkeypatch,
        "extract-features",
        slides,
        "--out",
        tmp_path / "f",
        "--checkpoint",
        path,
        "--device",
        "cpu",
        "--num-workers",
        "0",
    )
    assert code == 0, err
    with h5py.File(tmp_path / "f" / "slide_000.h5") as f:
        settings, coords = json.loads(f.attrs["settings"]), f["coords"][:]
    assert settings["backbone"] == str(path) and settings["source"] == "checkpoint"
    # the weights' fingerprint, not the file's: `evaluate` adding its operating point keeps it
    weights = torch.load(path, weights_only=True)["model"]
    checkpoint.save(path, {"model": weights, "config": cfg.to_dict(), "operating_point": {"threshold": 0.4}})
    assert load_encoder(DistInfo(), str(path)).fingerprint == settings["fingerprint"]
    assert settings["tile"] == 96 and settings["tile_mpp"] == 0.972 and settings["preprocessing"]["image_size"] == 48
    # 96 px at 0.972 um/px: tiles 192 level-0 px (0.486 um/px) apart
    assert set(np.diff(np.unique(coords[:, 0]))) == {192}


def test_the_backbone_is_rebuilt_from_a_files_settings_and_other_weights_are_refused(
    slides, tmp_path, capsys, monkeypatch
):
    """What predict-slide does with a MIL checkpoint's record: the --arch backbone, built with
    the config the extraction used (here a non-default input size), is found equal; a record of
    other weights is refused, naming the fingerprint."""
    from cancernet.data.tile_features import TileFeatures, TileSettings
    from cancernet.runtime.distributed import DistInfo
    from cancernet.runtime.errors import UserError
    from cancernet.wsi.extract import encoder_of

    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(slides / "slide_000.tif", one)
    code, _, err = extract(capsys, monkeypatch, one, tmp_path / "f", "data.image_size=64")
    assert code == 0, err
    made = TileFeatures(tmp_path / "f" / "slide_000.h5").settings
    assert made.source == "arch" and made.tile == 64 and made.preprocessing["image_size"] == 64
    encoder = encoder_of(made, DistInfo())
    assert not made.differences(encoder.settings(made.stride), TileSettings.BACKBONE)
    # the head only scores the features: another one is the same backbone
    head = {"seed": "linear", "linear": "seed"}[made.model["head"]]
    other_head = dataclasses.replace(made, model={**made.model, "head": head})
    assert encoder_of(other_head, DistInfo()).fingerprint == made.fingerprint
    other = dataclasses.replace(made, fingerprint="0" * 64)  # features of other weights (another release, say)
    with pytest.raises(UserError, match="fingerprint: 0{64} then"):
        encoder_of(other, DistInfo())


# Loaded into every rank through PYTHONPATH: the slide SLOW_SLIDE takes SLOW_S seconds longer.
SLOW_SLIDE = """
import builtins, os, sys, time
_import = builtins.__import__
def _patched(*args, **kwargs):
    module = _import(*args, **kwargs)
    for name, job in (("cancernet.wsi.extract", "ExtractJob"), ("cancernet.wsi.heatmap", "HeatmapJob")):
        cls = getattr(sys.modules.get(name), job, None)
        if cls is not None and not getattr(cls.run, "slowed", False):
            def run(self, path, real=cls.run):
                if path.stem == os.environ["SLOW_SLIDE"]:
                    time.sleep(float(os.environ["SLOW_S"]))
                return real(self, path)
            run.slowed = True
            cls.run = run
    return module
builtins.__import__ = _patched
"""


def test_a_rank_whose_slides_outlast_the_process_group_timeout_is_waited_for(slides, tmp_path):
    """extract-features and predict-slide under torchrun, one rank's slide taking 30 s longer than
    the other rank's work with a 10 s process-group timeout: neither rank waits in a collective
    meanwhile, so both finish, slides.csv lists every slide, and the exit code is 0."""
    from test_slide_mil import patch_checkpoint

    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(SLOW_SLIDE)
    env = {**python_env(), "PYTHONPATH": str(tmp_path / "inject"), "SLOW_SLIDE": "slide_001", "SLOW_S": "30"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cancernet"]
    checkpoint = patch_checkpoint(tmp_path / "patch.pt", seed=0)
    commands = {
        "feats": ["extract-features", slides, "--out", tmp_path / "feats", *BACKBONE],
        "maps": ["predict-slide", slides, "--out", tmp_path / "maps", "--checkpoint", checkpoint, "--num-workers", "1"],
    }
    for out, command in commands.items():
        proc = subprocess.run(
            [*launcher, *command, "--device", "cpu", "--timeout", "10s"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        listed = pd.read_csv(tmp_path / out / "slides.csv")
        assert sorted(listed["slide"]) == ["slide_000", "slide_001", "slide_002"], listed
        assert (listed["status"] == "done").all()
        assert not (tmp_path / out / ".ranks").exists()  # the rows' exchange leaves nothing behind
