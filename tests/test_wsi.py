"""Whole-slide inference on synthetic pyramidal TIFFs whose tumour cells are known exactly."""

import json
import os
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from test_inference import cli

from cancernet.cli import main
from cancernet.evaluate.metrics import roc_auc
from cancernet.runtime.console import main_guard
from cancernet.wsi.synthetic import ellipse, write_slide, write_slide_set

from conftest import train

ROWS, COLS = 30, 44  # cells of 32 training px; not square, so a transposed map cannot fit


@pytest.fixture(scope="module")
def ckpt(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("wsi_run")
    train(synth_root, out, "train.epochs=3", "data.image_size=48")
    return out / "checkpoints" / "best.pt"


def regions():
    tissue = ellipse((ROWS, COLS), (14, 17), (12, 15)) | ellipse((ROWS, COLS), (16, 37), (7, 5))
    tumour = ellipse((ROWS, COLS), (9, 13), (4, 6)) & tissue  # off-centre both ways, wider than tall
    return tissue, tumour


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    tissue, tumour = regions()
    path = write_slide(tmp_path_factory.mktemp("slide") / "case.tif", tissue, tumour, mpp=0.486, seed=7)
    return path, tissue, tumour


def misalignment(heatmap: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Where, in cells along (rows, cols), the map fits the truth best: the vertex of the parabola
    through its correlation with the truth moved by -1, 0 and +1 cell. A model's numbers vary
    with the CPU's kernels; where its map sits does not (trained maps, five seeds and two kernel
    sets: |offset| <= 0.09; tiles read half a cell off: 0.4 to 0.9)."""
    scored = np.isfinite(heatmap)

    def fit(t):
        return np.corrcoef(t[scored].astype(float), heatmap[scored])[0, 1]

    here, offsets = fit(truth), []
    for axis in (0, 1):
        before, after = (here - fit(np.roll(truth, d, axis)) for d in (-1, 1))
        assert before > 0 and after > 0, (axis, before, after)  # the map as it is fits best
        offsets.append((after - before) / (2 * (before + after)))
    return np.array(offsets)


def run_cli(capsys, monkeypatch, *args) -> tuple[int, str, str]:
    """A command line in this process: (exit code, stdout with the log, stderr)."""
    monkeypatch.setattr(sys, "argv", ["cancernet", *map(str, args)])
    code = main_guard(main)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def predict(capsys, monkeypatch, ckpt, out, *args):
    common = ("--checkpoint", ckpt, "--out", out, "--device", "cpu", "--num-workers", "0")
    return run_cli(capsys, monkeypatch, "predict-slide", *common, *args)


def test_heatmap_finds_the_tumour_where_it_is(ckpt, slide, tmp_path, capsys, monkeypatch):
    path, tissue, tumour = slide
    code, _, err = predict(capsys, monkeypatch, ckpt, tmp_path, path, "--tiff", "--geojson", "--threshold", "0.5")
    assert code == 0, err
    folder = tmp_path / "case"
    heatmap = np.load(folder / "heatmap.npy")
    assert heatmap.shape == (ROWS, COLS)
    scored = np.isfinite(heatmap)
    # the tissue mask keeps the section and leaves the glass out (cells on its edge may go either way)
    assert (scored & tissue).sum() / (scored | tissue).sum() > 0.9
    auc = roc_auc(tumour[scored], heatmap[scored])
    assert auc > 0.95
    # in place: the truth moved by one tile (3 cells) or mirrored fits the map worse
    for moved in (np.roll(tumour, 3, 0), np.roll(tumour, -3, 1)):
        assert roc_auc(moved[scored], heatmap[scored]) < auc - 0.05
    for mirrored in (tumour[::-1], tumour[:, ::-1]):
        assert roc_auc(mirrored[scored], heatmap[scored]) < auc - 0.3
    assert np.abs(misalignment(heatmap, tumour)).max() < 0.25  # a map scored half a cell off gives 0.4-0.9
    summary = json.loads((folder / "slide.json").read_text())
    assert summary["grid"] == [ROWS, COLS] and summary["level"] == 1 and summary["mpp"] == pytest.approx(0.486)
    assert summary["tiles"] == scored.sum() and summary["max"] == pytest.approx(np.nanmax(heatmap), abs=1e-6)
    top = np.sort(heatmap[scored])[::-1][: summary["top_k"]]
    assert summary["score"] == pytest.approx(top.mean(), abs=1e-6)
    cell_mm2 = (32 * 0.972 / 1000) ** 2
    assert summary["tumour_area_mm2"] == pytest.approx((heatmap[scored] >= 0.5).sum() * cell_mm2)
    tiles = pd.read_csv(folder / "tiles.csv")
    assert len(tiles) == scored.sum()
    assert np.allclose(heatmap[tiles["row"], tiles["col"]], tiles["prob"], atol=1e-5)
    # a tile is 96 training px centred on its 32 px cell: level-0 origin (col*32 - 32) * 2
    assert (tiles["x"] == (tiles["col"] * 32 - 32) * 2).all() and (tiles["y"] == (tiles["row"] * 32 - 32) * 2).all()
    import openslide

    overlay = openslide.OpenSlide(str(folder / "heatmap.tif"))
    assert overlay.dimensions == (COLS, ROWS)
    assert float(overlay.properties["openslide.mpp-x"]) == pytest.approx(32 * 0.972, rel=1e-4)
    assert (folder / "heatmap.png").stat().st_size > 10_000 and (folder / "thumbnail.jpg").is_file()
    # tumour.geojson: the regions at the threshold, in level-0 px (a cell is 64 px): each cell centre
    # inside a polygon is a cell at or above 0.5, and every such cell is inside one
    from matplotlib.path import Path as Outline

    regions = json.loads((folder / "tumour.geojson").read_text())
    assert regions["type"] == "FeatureCollection" and regions["features"]
    rows, cols = np.mgrid[0:ROWS, 0:COLS]
    centres = np.stack([(cols.ravel() + 0.5) * 64, (rows.ravel() + 0.5) * 64], axis=1)
    covered = np.zeros(ROWS * COLS, bool)
    for feature in regions["features"]:
        geometry = feature["geometry"]
        polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
        inside = np.zeros(ROWS * COLS, bool)
        for outline, *holes in polygons:
            here = Outline(outline).contains_points(centres)
            for hole in holes:
                here &= ~Outline(hole).contains_points(centres)
            inside |= here
        assert not (covered & inside).any()  # regions do not overlap
        covered |= inside
        cells = heatmap.ravel()[inside]
        assert feature["properties"]["cells"] == inside.sum() and feature["properties"]["probability_max"] == (
            pytest.approx(cells.max(), abs=1e-6)
        )
    assert np.array_equal(covered, np.nan_to_num(heatmap, nan=0).ravel() >= 0.5)


def test_background_is_never_read_or_scored(ckpt, slide, tmp_path, capsys, monkeypatch):
    import openslide

    path, tissue, _ = slide
    reads = []
    read_region = openslide.OpenSlide.read_region

    def counting(self, location, level, size):
        reads.append((location, level, size))
        return read_region(self, location, level, size)

    monkeypatch.setattr(openslide.OpenSlide, "read_region", counting)
    code, _, err = predict(capsys, monkeypatch, ckpt, tmp_path, path)
    assert code == 0, err
    tiles = pd.read_csv(tmp_path / "case" / "tiles.csv")
    near = np.zeros_like(tissue)  # tissue, grown by one cell (the mask's edge)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            near |= np.roll(np.roll(tissue, dr, 0), dc, 1)
    assert near[tiles["row"], tiles["col"]].all()
    assert len(tiles) < 0.75 * ROWS * COLS  # a third of the slide is glass
    # one thumbnail from a coarse level (the tissue mask), then regions at level 1 (0.972 um/px),
    # each covering the tiles of one block's tissue cells
    thumbnail = [r for r in reads if r[1] != 1]
    assert len(thumbnail) == 1 and thumbnail[0][1] > 1
    regions = [r for r in reads if r[1] == 1]
    pixels = sum(w * h for _, _, (w, h) in regions)
    assert pixels < 2.5 * len(tiles) * 32 * 32  # tile by tile: 9x (each pixel is in 9 tiles)
    summary = json.loads((tmp_path / "case" / "slide.json").read_text())
    assert summary["pixels_read_per_cell_pixel"] == pytest.approx(pixels / (len(tiles) * 32 * 32))
    for (x, y), _, (w, h) in regions:
        c0, r0, c1, r1 = (x // 2 + 32) // 32, (y // 2 + 32) // 32, (x // 2 + w - 64) // 32, (y // 2 + h - 64) // 32
        assert near[r0 : r1 + 1, c0 : c1 + 1].any()


@pytest.mark.slow
def test_torchrun_gives_the_same_heatmap(ckpt, tmp_path, capsys, monkeypatch):
    tissue, tumour = regions()
    # 0.6 um/px: no level matches 0.972, so tiles are read at level 0 and shrunk
    path = write_slide(tmp_path / "odd.tif", tissue, tumour, mpp=0.6, seed=3)
    code, _, err = predict(capsys, monkeypatch, ckpt, tmp_path / "single", path, "--tta")
    assert code == 0, err
    proc = cli(
        "predict-slide",
        "--checkpoint",
        str(ckpt),
        "--out",
        str(tmp_path / "ddp"),
        "--device",
        "cpu",
        "--tta",
        "--num-workers",
        "1",
        str(path),
        launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    single, ddp = (np.load(tmp_path / k / "odd" / "heatmap.npy") for k in ("single", "ddp"))
    assert np.isfinite(single).sum() > 300
    assert np.array_equal(np.isnan(single), np.isnan(ddp))
    assert np.allclose(single, ddp, atol=1e-5, equal_nan=True)
    summary = json.loads((tmp_path / "ddp" / "odd" / "slide.json").read_text())
    assert summary["world_size"] == 2 and summary["level"] == 0 and summary["tta"]
    assert roc_auc(tumour[np.isfinite(single)], single[np.isfinite(single)]) > 0.85


def test_bad_slides_cost_one_line_each_and_the_rest_are_done(ckpt, slide, tmp_path, capsys, monkeypatch):
    good, tissue, tumour = slide
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(good, folder / "good.tif")
    data = good.read_bytes()
    (folder / "truncated.tif").write_bytes(data[: len(data) // 2])
    shutil.copy(good, folder / "corrupt.tif")  # opens, but its level-1 tiles do not decode
    with tifffile.TiffFile(good) as tif:
        spans = list(zip(tif.pages[1].dataoffsets, tif.pages[1].databytecounts))
    with open(folder / "corrupt.tif", "r+b") as f:
        for offset, count in spans:
            f.seek(offset)
            f.write(bytes(count))
    (folder / "notes.svs").write_text("not a slide\n")
    blank = write_slide(tmp_path / "glass.tif", np.zeros_like(tissue), np.zeros_like(tissue))
    shutil.copy(blank, folder / "blank.tif")
    write_slide(folder / "nompp.tif", tissue, tumour, seed=2, resolution=False)
    tifffile.imwrite(folder / "patch.tif", np.full((96, 96, 3), 200, np.uint8))  # a Kaggle patch, not a slide
    code, log, err = predict(capsys, monkeypatch, ckpt, tmp_path / "out", folder)
    assert code == 1
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 6, log
    for name, why in (
        ("truncated.tif", "a TIFF that OpenSlide cannot open"),
        ("corrupt.tif", "could not read"),
        ("notes.svs", "not a format OpenSlide reads"),
        ("blank.tif", "no tissue"),
        ("nompp.tif", "pass --mpp"),
        (
            "patch.tif",
            "a 96 x 96 image, a patch rather than a slide; patches are scored by `python -m cancernet predict",
        ),
    ):
        assert any(name in line and why in line for line in errors), (name, errors)
    assert "6 of 7 slides failed" in err
    done = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert done == ["good", "slides.csv"]  # nothing half-written for the failed slides
    table = pd.read_csv(tmp_path / "out" / "slides.csv").set_index("slide")
    assert table["status"].to_dict() == {name: "done" if name == "good" else "failed" for name in table.index}
    assert len(table) == 7 and "no tissue" in table.loc["blank", "error"]
    stamp = (tmp_path / "out" / "good" / "slide.json").stat().st_mtime_ns
    code, log, err = predict(
        capsys, monkeypatch, ckpt, tmp_path / "out", folder / "good.tif", folder / "nompp.tif", "--mpp", "0.486"
    )
    assert code == 0, err
    assert "done before" in log and f"results: open {tmp_path / 'out' / 'slides.csv'}" in log
    assert (tmp_path / "out" / "good" / "slide.json").stat().st_mtime_ns == stamp  # resumed, not redone
    heatmap = np.load(tmp_path / "out" / "nompp" / "heatmap.npy")  # read at the --mpp given
    assert heatmap.shape == (ROWS, COLS)
    assert roc_auc(tumour[np.isfinite(heatmap)], heatmap[np.isfinite(heatmap)]) > 0.95


def test_a_checkpoint_without_its_resolution_needs_train_mpp(ckpt, slide, tmp_path, capsys, monkeypatch):
    state = torch.load(ckpt, weights_only=True)
    del state["config"]["data"]["mpp"]  # as cancernet wrote them before data.mpp existed
    old = tmp_path / "old.pt"
    torch.save(state, old)
    code, _, err = predict(capsys, monkeypatch, old, tmp_path / "out", slide[0])
    assert code == 2 and "--train-mpp" in err and str(old) in err and len(err.strip().splitlines()) == 1
    code, _, err = predict(capsys, monkeypatch, old, tmp_path / "out", slide[0], "--train-mpp", "0.972")
    assert code == 0, err


def test_evaluate_slides_scores_slides_and_cells(ckpt, tmp_path, capsys, monkeypatch):
    write_slide_set(tmp_path / "set", 4, rows=24, cols=32, seed=5)
    labels = pd.read_csv(tmp_path / "set" / "slides.csv")
    assert labels["label"].tolist() == [0, 1, 0, 1]
    args = (
        "evaluate-slides",
        "--checkpoint",
        str(ckpt),
        str(tmp_path / "set" / "slides"),
        "--labels",
        str(tmp_path / "set" / "slides.csv"),
        "--masks",
        str(tmp_path / "set" / "masks"),
        "--mask-downsample",
        "16",
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
        "--num-workers",
        "0",
    )
    code, _, err = run_cli(capsys, monkeypatch, *args)
    assert code == 0, err
    metrics = json.loads((tmp_path / "out" / "slides.json").read_text())
    frame = pd.read_csv(tmp_path / "out" / "slides.csv")
    assert metrics["slides"] == 4 and metrics["positives"] == 2
    assert metrics["slide_auc"] == pytest.approx(roc_auc(frame["label"], frame["score"]))
    assert metrics["slide_auc"] == 1.0  # tumour slides hold tumour cells; normal slides none
    lo, hi = metrics["slide_auc_ci"]
    assert lo <= metrics["slide_auc"] <= hi
    assert metrics["cell_auc"] > 0.9 and metrics["cells_tumour"] > 20
    assert frame.loc[frame["label"] == 1, "cell_auc"].gt(0.85).all()
    assert (tmp_path / "out" / "slides_report.png").stat().st_size > 20_000
    code, log, _ = run_cli(capsys, monkeypatch, *args)  # again: the slides' predictions are reused
    assert code == 0 and log.count("done before") == 4


def test_a_done_slide_is_predicted_again_with_other_settings(ckpt, slide, tmp_path, capsys, monkeypatch):
    code, _, err = predict(capsys, monkeypatch, ckpt, tmp_path, slide[0])
    assert code == 0, err
    code, log, err = predict(capsys, monkeypatch, ckpt, tmp_path, slide[0], "--stride", "64")
    assert code == 0, err
    assert "done before with other settings (slide)" in log
    summary = json.loads((tmp_path / "case" / "slide.json").read_text())
    assert summary["grid"] == [ROWS // 2, COLS // 2] and summary["stride"] == 64
    assert np.load(tmp_path / "case" / "heatmap.npy").shape == (ROWS // 2, COLS // 2)


def test_tissue_mask_thresholds_saturation_and_fills_only_small_holes():
    from PIL import Image

    from cancernet.config import SlideConfig
    from cancernet.wsi.slide import tissue_mask

    rng = np.random.default_rng(0)
    rgb = np.full((200, 300, 3), 240, np.uint8)  # glass
    rgb[20:180, 20:280] = (200, 120, 170)  # a pink section...
    rgb[50:56, 50:56] = 240  # ...with a small hole (6x6 px = 36 x 64 um2)
    rgb[80:160, 150:260] = 240  # ...and a large one (80x110 px)
    rgb = np.clip(rgb + rng.normal(0, 2, rgb.shape), 0, 255).astype(np.uint8)
    mask = tissue_mask(Image.fromarray(rgb), 8.0, SlideConfig(fill_holes_um2=5000))
    assert mask[50:56, 50:56].all()  # filled
    assert not mask[90:150, 160:250].any()  # left open
    assert not mask[:15].any() and mask[100:120, 30:140].all()
    assert not tissue_mask(Image.fromarray(rgb[:15]), 8.0, SlideConfig()).any()  # glass alone: no tissue


def test_a_checkpoint_retrained_at_the_same_path_predicts_done_slides_again(ckpt, slide, tmp_path, capsys, monkeypatch):
    """best.pt replaced by another model at the same path, with the same size and modification
    time (a copy that keeps them, `cp -p`, `rsync -a`): the slide's old map is not reused."""
    local = tmp_path / "best.pt"
    torch.save(torch.load(ckpt, weights_only=True), local)  # as torch.save writes it: a change keeps its size
    code, _, err = predict(capsys, monkeypatch, local, tmp_path / "maps", slide[0])
    assert code == 0, err
    before = np.load(tmp_path / "maps" / "case" / "heatmap.npy")
    stat = local.stat()
    state = torch.load(local, weights_only=True)
    state["model"] = {k: v.neg() if v.is_floating_point() and v.ndim > 1 else v for k, v in state["model"].items()}
    torch.save(state, local)
    os.utime(local, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert local.stat().st_size == stat.st_size and local.stat().st_mtime_ns == stat.st_mtime_ns
    code, log, err = predict(capsys, monkeypatch, local, tmp_path / "maps", slide[0])
    assert code == 0, err
    assert "done before with other settings (checkpoint_sha256)" in log
    after = np.load(tmp_path / "maps" / "case" / "heatmap.npy")
    assert not np.allclose(before, after, equal_nan=True)


def test_tta_maps_are_made_from_the_eight_views_slide_json_says(ckpt, slide, tmp_path, capsys, monkeypatch):
    """--tta averages each tile's 8 dihedral views: its map is not the plain one, stays close to it
    (same model, same tiles), and slide.json says how it was made."""
    maps = {}
    for name, extra in (("plain", ()), ("tta", ("--tta",))):
        code, _, err = predict(capsys, monkeypatch, ckpt, tmp_path / name, slide[0], *extra)
        assert code == 0, err
        maps[name] = np.load(tmp_path / name / "case" / "heatmap.npy")
        assert json.loads((tmp_path / name / "case" / "slide.json").read_text())["settings"]["tta"] == (name == "tta")
    scored = np.isfinite(maps["plain"])
    assert np.array_equal(scored, np.isfinite(maps["tta"]))
    difference = np.abs(maps["tta"][scored] - maps["plain"][scored])
    assert difference.max() > 1e-3  # the views were scored: a plain map under a tta label fails here
    assert np.corrcoef(maps["tta"][scored], maps["plain"][scored])[0, 1] > 0.8
