"""The whole slide-level path: slides -> extract-features -> a MIL run -> predict-slide with its best.pt."""

import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from test_wsi import predict

from cancernet.wsi.synthetic import write_slide_set

from conftest import CONFIGS

pytestmark = pytest.mark.slow


def patch_checkpoint(path, seed: int):
    """A patch model's best.pt (untrained weights of `seed`): the features' backbone."""
    from cancernet.config import Config
    from cancernet.engine import checkpoint
    from cancernet.models.classifier import build_for_weights

    cfg = Config()
    cfg.model.arch, cfg.data.image_size, cfg.data.mpp = "resnet18", 48, 0.972
    torch.manual_seed(seed)
    checkpoint.save(path, {"model": build_for_weights(cfg).state_dict(), "config": cfg.to_dict()})
    return path


@pytest.fixture(scope="module")
def slide_run(tmp_path_factory):
    """12 synthetic slides, their features from a patch checkpoint's backbone, a 2-epoch ABMIL run."""
    import dataclasses

    from cancernet.config import SlideConfig, load_config
    from cancernet.runtime.distributed import DistInfo, session
    from cancernet.train.runner import run
    from cancernet.wsi.driver import list_slides
    from cancernet.wsi.extract import Reading, extract_features, load_encoder

    root = tmp_path_factory.mktemp("slide_mil")
    write_slide_set(root, 12, rows=24, cols=32, seed=3)
    backbone = patch_checkpoint(root / "patch.pt", seed=0)
    encoder = load_encoder(DistInfo(), str(backbone))
    slide_cfg = dataclasses.replace(SlideConfig(), stride=encoder.tile)
    reading = Reading(slide_cfg, batch_size=64, num_workers=0)
    rows = extract_features(encoder, list_slides([root / "slides"]), root / "feats", DistInfo(), reading)
    assert all(r["status"] == "done" for r in rows)
    cfg = load_config(
        CONFIGS / "mil.yaml",
        [
            f"data.features={root / 'feats'}",
            f"data.slides_csv={root / 'slides.csv'}",
            f"train.out_dir={root / 'run'}",
            "train.device=cpu",
            "train.amp=off",
            "data.num_workers=0",
            "train.steps=null",
            "train.epochs=2",
            "data.val_fraction=0.25",
            "data.test_fraction=0.25",
            "report.bootstrap=50",
        ],
    )
    with session("cpu") as dist:
        assert run(cfg, dist) == "done"
    return root


def test_predict_slide_gives_the_runs_slide_probability_and_attention_beside_the_patch_heatmap(
    slide_run, tmp_path, capsys, monkeypatch
):
    best = slide_run / "run" / "checkpoints" / "best.pt"
    test = pd.read_csv(slide_run / "run" / "predictions" / "test.csv")
    slides = [slide_run / "slides" / f"{s}.tif" for s in test["id"]]
    code, log, err = predict(capsys, monkeypatch, best, tmp_path / "out", *slides, "--batch-size", "64")
    assert code == 0, err
    threshold = torch.load(best, weights_only=True)["operating_point"]["threshold"]
    for row in test.itertuples():
        folder = tmp_path / "out" / row.id
        summary = json.loads((folder / "slide.json").read_text())
        # the same tiles through the same backbone: the run's own test prediction of this slide (up to
        # float16 features rounding one way or the other)
        assert summary["slide_prob"] == pytest.approx(row.prob, abs=1e-3)
        assert summary["threshold"] == threshold and summary["slide_label"] == int(row.prob >= threshold)
        tiles = pd.read_csv(folder / "tiles.csv")
        with h5py.File(slide_run / "feats" / f"{row.id}.h5") as f:
            assert (tiles[["x", "y"]].to_numpy() == f["coords"][:]).all()
        # the attention weights sum to one; the run's top tile is (to rounding) the top one here too
        assert tiles["attention"].sum() == pytest.approx(1, abs=1e-4)
        # slide.json's top tiles are the most attended, most first, each where tiles.csv has it
        top = summary["top_tiles"]
        assert [t["attention"] for t in top] == pytest.approx(
            sorted(tiles["attention"], reverse=True)[: len(top)], abs=1e-6
        )
        at = tiles.set_index(["x", "y"])["attention"]
        assert all(at[(t["x"], t["y"])] == pytest.approx(t["attention"], abs=1e-6) for t in top)
        assert tiles["attention"].max() == pytest.approx(row.attention_max, abs=1e-4) == summary["attention_max"]
        assert tiles["attention"][row.top_tile] == pytest.approx(row.attention_max, abs=1e-4)
        # the backbone is a trained patch model: its own P(tumour) of each tile, as a heatmap beside
        heatmap, attention = np.load(folder / "heatmap.npy"), np.load(folder / "attention.npy")
        assert heatmap.shape == attention.shape and np.isfinite(attention).sum() == len(tiles) == summary["tiles"]
        assert np.allclose(np.sort(heatmap[np.isfinite(heatmap)]), np.sort(tiles["prob"]), atol=1e-5)
        assert np.nanmax(attention) == 1.0 and (folder / "attention.png").stat().st_size > 10_000
    code, log, _ = predict(capsys, monkeypatch, best, tmp_path / "out", *slides)
    assert code == 0 and f"0 done, {len(slides)} done before" in log  # a rerun skips what is done


@pytest.mark.parametrize("arch", ["abmil", "clam_sb", "transmil", "dsmil", "mean", "max"])
def test_every_slide_level_model_trains_reports_and_predicts_slides(slide_run, tmp_path, capsys, monkeypatch, arch):
    """Each model.mil choice through the whole path: two epochs, the test report, predict-slide
    giving the run's own probability of a test slide."""
    from cancernet.config import load_config
    from cancernet.runtime.distributed import session
    from cancernet.train.runner import run

    cfg = load_config(
        CONFIGS / "mil.yaml",
        [
            f"data.features={slide_run / 'feats'}",
            f"data.slides_csv={slide_run / 'slides.csv'}",
            f"train.out_dir={tmp_path / 'run'}",
            f"model.mil={arch}",
            *("train.device=cpu", "train.amp=off", "data.num_workers=0", "train.steps=null", "train.epochs=2"),
            *("data.val_fraction=0.25", "data.test_fraction=0.25", "report.bootstrap=50"),
        ],
    )
    with session("cpu") as dist:
        assert run(cfg, dist) == "done"
    metrics = json.loads((tmp_path / "run" / "report" / "metrics.json").read_text())
    test = pd.read_csv(tmp_path / "run" / "predictions" / "test.csv")
    assert metrics["level"] == "slide" and metrics["n"] == len(test) > 0 and metrics["run"]["mil"] == arch
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    row = test.iloc[0]
    slide = slide_run / "slides" / f"{row.id}.tif"
    # the extraction's batch and the run's precision (auto would be bf16 on some CPUs)
    code, _, err = predict(capsys, monkeypatch, best, tmp_path / "out", slide, "--batch-size", "64", "--amp", "off")
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / row.id / "slide.json").read_text())
    assert summary["slide_prob"] == pytest.approx(row.prob, abs=1e-3) and summary["score_kind"] == f"mil:{arch}"
    assert pd.read_csv(tmp_path / "out" / row.id / "tiles.csv")["attention"].sum() == pytest.approx(1, abs=1e-4)


def test_features_of_a_patch_model_give_the_report_its_heads_pooled_baselines(slide_run):
    """extract-features keeps the patch model's tile log-odds beside the features: the report
    scores each test slide by the head's max, top-3 mean and mean, as the model's baselines."""
    from sklearn.metrics import roc_auc_score

    metrics = json.loads((slide_run / "run" / "report" / "metrics.json").read_text())
    test = pd.read_csv(slide_run / "run" / "predictions" / "test.csv")
    maxima = []
    for slide in test["id"]:
        with h5py.File(slide_run / "feats" / f"{slide}.h5") as f:
            maxima.append((1 / (1 + np.exp(-f["log_odds"][:].astype(np.float64)))).max())
    baselines = metrics["baselines"]
    assert set(baselines) == {
        "patch head, max",
        "patch head, top3_mean",
        "patch head, mean",
        "mean feature, logistic regression",
    }
    assert baselines["patch head, max"]["roc_auc"] == pytest.approx(roc_auc_score(test["label"], maxima))


def test_a_backbone_changed_since_extraction_is_refused_and_backbone_points_to_the_right_one(
    slide_run, tmp_path, capsys, monkeypatch
):
    best = slide_run / "run" / "checkpoints" / "best.pt"
    slide = slide_run / "slides" / "slide_000.tif"
    moved = tmp_path / "kept.pt"
    shutil.copy(slide_run / "patch.pt", moved)
    patch_checkpoint(slide_run / "patch.pt", seed=1)  # retrained at the same path
    try:
        code, _, err = predict(capsys, monkeypatch, best, tmp_path / "a", slide)
        assert code == 2 and "fingerprint" in err and "not the one the features were made with" in err, err
        code, _, err = predict(capsys, monkeypatch, best, tmp_path / "b", slide, "--backbone", moved)
        assert code == 0, err
        assert (tmp_path / "b" / "slide_000" / "slide.json").is_file()
    finally:
        shutil.copy(moved, slide_run / "patch.pt")


def test_patch_only_options_and_patch_commands_refuse_a_mil_checkpoint(slide_run, tmp_path, capsys, monkeypatch):
    from test_wsi import run_cli

    from cancernet.engine.inference import Predictor
    from cancernet.runtime.distributed import DistInfo
    from cancernet.runtime.errors import UserError

    best = slide_run / "run" / "checkpoints" / "best.pt"
    code, _, err = predict(capsys, monkeypatch, best, tmp_path / "a", slide_run / "slides", "--tta", "--geojson")
    assert code == 2 and "--tta, --geojson: not for a slide-level (MIL) checkpoint" in err, err
    with pytest.raises(UserError, match="is a slide-level \\(MIL\\) model.*predict-slide"):
        Predictor.load(best, DistInfo())
    code, _, err = run_cli(capsys, monkeypatch, "evaluate", slide_run / "run")
    assert code == 2 and "is a slide-level (MIL) run" in err and "evaluate-slides" in err, err


def test_evaluate_slides_scores_new_labelled_slides_by_slide_prob_and_the_attention_against_masks(
    slide_run, tmp_path, capsys, monkeypatch
):
    from sklearn.metrics import roc_auc_score
    from test_wsi import run_cli

    best = slide_run / "run" / "checkpoints" / "best.pt"
    code, _, err = run_cli(
        capsys,
        monkeypatch,
        "evaluate-slides",
        "--checkpoint",
        best,
        slide_run / "slides",
        "--labels",
        slide_run / "slides.csv",
        "--masks",
        slide_run / "masks",
        "--mask-downsample",
        "16",
        "--out",
        tmp_path / "ev",
        "--device",
        "cpu",
        "--num-workers",
        "0",
    )
    assert code == 0, err
    metrics = json.loads((tmp_path / "ev" / "slides.json").read_text())
    assert metrics["slides"] == 12 and metrics["score"] == "mil:abmil" and metrics["cells_scored_by"] == "attention"
    # the slide AUC is that of each slide's own slide.json probability
    labels = pd.read_csv(slide_run / "slides.csv")
    folders = [tmp_path / "ev" / s.removesuffix(".tif") for s in labels["slide"]]
    probs = [json.loads((f / "slide.json").read_text())["slide_prob"] for f in folders]
    assert metrics["slide_auc"] == pytest.approx(roc_auc_score(labels["label"], probs))
    assert metrics["slide_auc_ci"][0] <= metrics["slide_auc"] <= metrics["slide_auc_ci"][1]
    # cells: the attention against the tumour masks, over every tissue tile of the slides
    assert 0 < metrics["cells_tumour"] < metrics["cells"] and 0 <= metrics["cell_auc"] <= 1
    assert (tmp_path / "ev" / "slides_report.png").is_file() and (tmp_path / "ev" / "slides_roc.png").is_file()


def test_the_whole_path_runs_on_slides_of_real_patches_with_the_documented_commands(tmp_path, capsys, monkeypatch):
    """Genuine patches all the way: a patch model trained on the 20 real fixture patches
    (`train`), eight slides made of those patches on real glass, `extract-features --checkpoint`,
    configs/mil.yaml (`train`), `predict-slide` with its best.pt. The tissue mask keeps every real
    tissue tile and no glass; every command ends well."""
    from test_tissue import FIXTURES, real_patches
    from test_wsi import run_cli

    from cancernet.wsi.synthetic import focus_cells, write_patch_slide

    patches, labels, glass = real_patches()
    patches, labels = patches[:20], labels[:20]  # the pcam_real fixture: 10 tumour, 10 normal
    device = ("train.device=cpu", "train.amp=off", "data.num_workers=0", "train.progress=off")
    code, _, err = run_cli(
        capsys, monkeypatch, "train", "--config", CONFIGS / "cpu_test.yaml", f"data.root={FIXTURES / 'pcam_real'}",
        f"train.out_dir={tmp_path / 'patch'}", "data.image_size=96", "train.batch_size=4", "train.epochs=1", *device,
    )  # fmt: skip
    assert code == 0, err
    rng = np.random.default_rng(0)
    tissue = np.zeros((6, 6), bool)
    tissue[1:5, 1:5] = True  # 16 patches on a margin of glass
    rows = []
    for i in range(8):
        grid = np.full(tissue.shape, -1)
        grid[tissue] = rng.choice(np.flatnonzero(labels == 0), tissue.sum(), replace=True)
        focus = focus_cells(rng, tissue, 3) if i % 2 else np.zeros_like(tissue)
        grid[focus] = rng.choice(np.flatnonzero(labels == 1), focus.sum(), replace=False)
        write_patch_slide(tmp_path / "slides" / f"s{i}.tif", grid, patches, glass[i % 2])
        rows.append({"slide": f"s{i}", "label": i % 2})
    pd.DataFrame(rows).to_csv(tmp_path / "slides.csv", index=False)
    best = tmp_path / "patch" / "checkpoints" / "best.pt"
    code, _, err = run_cli(
        capsys, monkeypatch, "extract-features", tmp_path / "slides", "--out", tmp_path / "feats",
        "--checkpoint", best, "--device", "cpu", "--num-workers", "0",
    )  # fmt: skip
    assert code == 0, err
    for i in range(8):
        with h5py.File(tmp_path / "feats" / f"s{i}.h5", "r") as f:
            assert len(f["features"]) == tissue.sum()  # every real tissue patch kept, no glass
    code, _, err = run_cli(
        capsys, monkeypatch, "train", "--config", CONFIGS / "mil.yaml", f"data.features={tmp_path / 'feats'}",
        f"data.slides_csv={tmp_path / 'slides.csv'}", f"train.out_dir={tmp_path / 'mil'}", "train.steps=20",
        "data.val_fraction=0.25", "data.test_fraction=0.25", "report.bootstrap=20", *device,
    )  # fmt: skip
    assert code == 0, err
    metrics = json.loads((tmp_path / "mil" / "report" / "metrics.json").read_text())
    assert metrics["level"] == "slide" and metrics["n"] == 2 and "patch head, max" in metrics["baselines"]
    code, _, err = predict(capsys, monkeypatch, tmp_path / "mil" / "checkpoints" / "best.pt", tmp_path / "dx",
                           tmp_path / "slides" / "s1.tif")  # fmt: skip
    assert code == 0, err
    assert 0 <= json.loads((tmp_path / "dx" / "s1" / "slide.json").read_text())["slide_prob"] <= 1
