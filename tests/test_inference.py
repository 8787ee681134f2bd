import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from cancernet.cli import main
from cancernet.data.patch import read_patch
from cancernet.engine.inference import Predictor
from cancernet.evaluate.patch_predict import predict_folder
from cancernet.runtime.console import main_guard
from cancernet.runtime.distributed import DistInfo

from conftest import ROOT, python_env, train


def cli(*args, launcher=(sys.executable,)):
    """The command in a new process (what torchrun and users run)."""
    return subprocess.run(
        [*launcher, "-m", "cancernet", *args], cwd=ROOT, env=python_env(), capture_output=True, text=True, timeout=600
    )


def run_cli(capsys, monkeypatch, *args) -> tuple[int, str]:
    """The same command line in this process (saves a torch import per call): (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["cancernet", *args])
    code = main_guard(main)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def run_dir(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("infer_run")
    train(synth_root, out, "train.epochs=3", "data.image_size=48")
    return out


@pytest.fixture(scope="module")
def ckpt(run_dir):
    return run_dir / "checkpoints" / "best.pt"


def _some_ids(synth_root, n=40, seed=0):
    labels = pd.read_csv(synth_root / "train_labels.csv", dtype={"id": str})
    return labels.sample(n, random_state=seed)


@pytest.mark.slow
def test_submission_follows_the_ids_file_order(synth_root, ckpt, tmp_path, capsys, monkeypatch):
    chosen = _some_ids(synth_root)
    chosen[["id"]].assign(label=0).to_csv(tmp_path / "ids.csv", index=False)
    out = tmp_path / "submission.csv"
    code, err = run_cli(
        capsys,
        monkeypatch,
        "predict",
        "--checkpoint",
        str(ckpt),
        str(synth_root / "train"),
        "--ids",
        str(tmp_path / "ids.csv"),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--num-workers",
        "0",
    )
    assert code == 0, err
    sub = pd.read_csv(out, dtype={"id": str})
    assert list(sub.columns) == ["id", "label"]
    assert sub["id"].tolist() == chosen["id"].tolist()
    assert sub["label"].between(0, 1).all() and sub["label"].nunique() > 2  # probabilities


@pytest.mark.slow
def test_each_probability_belongs_to_the_image_named_beside_it(synth_root, ckpt, tmp_path, capsys, monkeypatch):
    """Shuffled ids, batches of 8 with 2 loader workers: each row equals that image predicted alone."""
    chosen = _some_ids(synth_root, 20, seed=5).sample(frac=1.0, random_state=1)
    chosen[["id"]].to_csv(tmp_path / "ids.csv", index=False)
    code, err = run_cli(
        capsys,
        monkeypatch,
        "predict",
        "--checkpoint",
        str(ckpt),
        str(synth_root / "train"),
        "--ids",
        str(tmp_path / "ids.csv"),
        "--out",
        str(tmp_path / "s.csv"),
        "--device",
        "cpu",
        "--num-workers",
        "2",
        "--batch-size",
        "8",
        "--amp",
        "off",
    )
    assert code == 0, err
    sub = pd.read_csv(tmp_path / "s.csv", dtype={"id": str})
    predictor = Predictor.load(ckpt, DistInfo())
    alone = [predict_folder(predictor, [synth_root / "train" / f"{i}.tif"], 1, 0)[0] for i in sub["id"]]
    assert sub["id"].tolist() == chosen["id"].tolist()
    assert np.allclose(sub["label"].to_numpy(), alone, atol=1e-6)
    assert np.std(alone) > 1e-3  # the images do get different probabilities


@pytest.mark.slow
def test_predict_a_whole_folder_of_png_and_tif(synth_root, ckpt, tmp_path, capsys, monkeypatch):
    from PIL import Image

    folder = tmp_path / "mixed"
    folder.mkdir()
    chosen = _some_ids(synth_root, 6)["id"].tolist()
    for k, i in enumerate(chosen):
        Image.fromarray(read_patch(synth_root / "train" / f"{i}.tif")).save(folder / f"{i}.{'png' if k % 2 else 'tif'}")
    out = tmp_path / "sub.csv"
    code, err = run_cli(
        capsys,
        monkeypatch,
        "predict",
        "--checkpoint",
        str(ckpt),
        str(folder),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--num-workers",
        "0",
    )
    assert code == 0, err
    assert sorted(pd.read_csv(out, dtype={"id": str})["id"]) == sorted(chosen)


@pytest.mark.slow
def test_torchrun_predict_matches_single_process(synth_root, ckpt, tmp_path, capsys, monkeypatch):
    chosen = _some_ids(synth_root, 50, seed=1)
    chosen[["id"]].to_csv(tmp_path / "ids.csv", index=False)
    common = (
        "predict",
        "--checkpoint",
        str(ckpt),
        str(synth_root / "train"),
        "--ids",
        str(tmp_path / "ids.csv"),
        "--device",
        "cpu",
    )
    code, err = run_cli(capsys, monkeypatch, *common, "--out", str(tmp_path / "single.csv"), "--num-workers", "0")
    assert code == 0, err
    proc = cli(
        *common,
        "--out",
        str(tmp_path / "ddp.csv"),
        launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    single, ddp = (pd.read_csv(tmp_path / f"{k}.csv", dtype={"id": str}) for k in ("single", "ddp"))
    assert ddp["id"].tolist() == single["id"].tolist() == chosen["id"].tolist()
    assert np.allclose(ddp["label"], single["label"], atol=1e-5)


@pytest.mark.slow
def test_operating_points_are_chosen_and_applied_on_predictions_made_the_same_way(
    synth_root, run_dir, ckpt, tmp_path, capsys, monkeypatch
):
    code, err = run_cli(capsys, monkeypatch, "evaluate", str(run_dir), "--tta", "--target-sensitivity", "0.95")
    assert code == 0, err
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    # the mean of eight views of one model: never much worse than one view (0.02 is ~15 of the
    # ~900 test pairs swapped, room for another CPU's kernels; a TTA that scored noise loses ~0.5)
    assert metrics["tta"]["roc_auc"] >= metrics["roc_auc"] - 0.02
    chosen = metrics["target_sensitivity"]
    assert chosen["chosen_on"] == "val" and chosen["val"]["sensitivity"] >= 0.95
    state = torch.load(ckpt, weights_only=True)
    point, tta_point, temperature = state["operating_point"], state["operating_point_tta"], state["temperature"]
    assert point == {
        "threshold": chosen["val"]["threshold"],
        "method": "target_sensitivity",
        "target": 0.95,
        "chosen_on": "val",
        "tta": False,
        "temperature": temperature,
    }
    assert tta_point["tta"] and tta_point["method"] == "target_sensitivity"
    # each point is chosen on validation predictions made the way it will be applied
    from cancernet.evaluate.metrics import threshold_for_sensitivity

    for name, used in (("val.csv", point), ("val_tta.csv", tta_point)):
        val = pd.read_csv(run_dir / "predictions" / name)
        assert used["threshold"] == pytest.approx(threshold_for_sensitivity(val["label"], val["prob"], 0.95), abs=1e-6)
        assert (val["prob"][val["label"] == 1] >= used["threshold"]).mean() >= 0.95
    test_tta = pd.read_csv(run_dir / "predictions" / "test_tta.csv")
    assert (test_tta["pred"] == (test_tta["prob"] >= tta_point["threshold"])).all()
    # predict labels with the point that matches how it predicts
    ids = _some_ids(synth_root, 30, seed=2)
    ids[["id"]].to_csv(tmp_path / "ids.csv", index=False)
    base = (
        "predict",
        "--checkpoint",
        str(ckpt),
        str(synth_root / "train"),
        "--ids",
        str(tmp_path / "ids.csv"),
        "--device",
        "cpu",
        "--num-workers",
        "0",
    )
    for tta, used in ((False, point), (True, tta_point)):
        extra = ("--tta",) if tta else ()
        assert run_cli(capsys, monkeypatch, *base, *extra, "--out", str(tmp_path / "p.csv"))[0] == 0
        assert (
            run_cli(
                capsys, monkeypatch, *base, *extra, "--out", str(tmp_path / "l.csv"), "--threshold-from-checkpoint"
            )[0]
            == 0
        )
        probs, labels = pd.read_csv(tmp_path / "p.csv"), pd.read_csv(tmp_path / "l.csv")
        assert set(labels["label"]) <= {0, 1}
        assert (labels["label"] == (probs["label"] >= used["threshold"] - 1e-6).astype(int)).all()
    # a point chosen on calibrated plain predictions is refused for uncalibrated ones ...
    code, err = run_cli(
        capsys, monkeypatch, *base, "--out", str(tmp_path / "x.csv"), "--threshold-from-checkpoint", "--no-calibration"
    )
    assert code == 2 and "temperature" in err
    # ... and a checkpoint with only a plain point cannot label TTA predictions
    plain_only = tmp_path / "plain_only.pt"
    torch.save({k: v for k, v in state.items() if k != "operating_point_tta"}, plain_only)
    code, err = run_cli(
        capsys,
        monkeypatch,
        "predict",
        "--checkpoint",
        str(plain_only),
        *base[3:],
        "--out",
        str(tmp_path / "y.csv"),
        "--tta",
        "--threshold-from-checkpoint",
    )
    assert code == 2 and "TTA" in err and "evaluate RUN --tta" in err
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "y.csv").exists()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_export_gives_the_checkpoints_outputs(synth_root, ckpt, tmp_path):
    proc = cli("export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "export"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(name in proc.stdout + proc.stderr for name in ("model.ts", "model.pt2", "weights.pt", "model.json"))
    ids = _some_ids(synth_root, 12, seed=3)["id"].tolist()
    paths = [synth_root / "train" / f"{i}.tif" for i in ids]
    predictor = Predictor.load(ckpt, DistInfo())
    model, saved = predictor.model, predictor.ckpt
    expected = predict_folder(predictor, paths, 8, 0)
    scripted = torch.jit.load(str(tmp_path / "export" / "model.ts"))
    program = torch.export.load(str(tmp_path / "export" / "model.pt2")).module()
    batch = torch.from_numpy(np.stack([read_patch(p) for p in paths]))  # uint8 NHWC
    with torch.no_grad():
        assert np.allclose(scripted(batch).numpy(), expected, atol=1e-5)
        assert np.allclose(program(batch).numpy(), expected, atol=1e-5)
    weights = torch.load(tmp_path / "export" / "weights.pt", weights_only=True)
    model.load_state_dict(weights)  # plain state dict of the same architecture
    info = json.loads((tmp_path / "export" / "model.json").read_text())
    assert info["arch"] == "resnet18" and info["image_size"] == 48 and info["temperature"] == saved.temperature()
    assert "torchvision's ResNet18_Weights" in info["preprocessing_source"]  # data.mean/std from the weights


@pytest.mark.slow
def test_missing_image_is_a_clear_error_and_nothing_is_written(synth_root, ckpt, tmp_path, capsys, monkeypatch):
    pd.DataFrame({"id": ["f" * 40]}).to_csv(tmp_path / "ids.csv", index=False)
    out = tmp_path / "sub.csv"
    code, err = run_cli(
        capsys,
        monkeypatch,
        "predict",
        "--checkpoint",
        str(ckpt),
        str(synth_root / "train"),
        "--ids",
        str(tmp_path / "ids.csv"),
        "--out",
        str(out),
    )
    assert code == 2 and "f" * 40 in err and "not found" in err
    assert not out.exists()


@pytest.mark.slow
def test_an_id_that_would_leave_the_image_folder_is_refused(synth_root, ckpt, tmp_path, capsys, monkeypatch):
    pd.DataFrame({"id": ["../secret"]}).to_csv(tmp_path / "ids.csv", index=False)
    code, err = run_cli(
        capsys,
        monkeypatch,
        "predict",
        "--checkpoint",
        str(ckpt),
        str(synth_root / "train"),
        "--ids",
        str(tmp_path / "ids.csv"),
        "--out",
        str(tmp_path / "s.csv"),
    )
    assert code == 2 and "row 2 has id '../secret'" in err


@pytest.mark.slow
def test_unreadable_image_is_a_clear_error(synth_root, ckpt, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "broken.tif").write_bytes(b"II*\x00garbage")
    code, err = run_cli(
        capsys,
        monkeypatch,
        "predict",
        "--checkpoint",
        str(ckpt),
        str(folder),
        "--out",
        str(tmp_path / "s.csv"),
        "--num-workers",
        "0",
    )
    assert code == 2 and "broken.tif" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.csv").exists()


def test_corrupt_checkpoint_is_a_clear_error(synth_root, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    code, err = run_cli(
        capsys,
        monkeypatch,
        "predict",
        "--checkpoint",
        str(bad),
        str(synth_root / "train"),
        "--out",
        str(tmp_path / "s.csv"),
    )
    assert code == 2 and str(bad) in err and "corrupt" in err


@pytest.mark.slow
def test_checkpoint_of_another_arch_is_a_clear_error(synth_root, ckpt, tmp_path, capsys, monkeypatch):
    state = torch.load(ckpt, weights_only=True)
    state["config"]["model"]["arch"] = "resnet34"  # weights of a resnet18, config says resnet34
    wrong = tmp_path / "wrong.pt"
    torch.save(state, wrong)
    code, err = run_cli(capsys, monkeypatch, "export", "--checkpoint", str(wrong), "--out", str(tmp_path / "x"))
    assert code == 2 and "does not fit" in err and "resnet34" in err
