import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from cancernet.data.kaggle import read_patch
from cancernet.inference import load_model, predict_folder
from cancernet.distributed import DistInfo
from conftest import ROOT, python_env, train


def cli(*args, launcher=(sys.executable,)):
    return subprocess.run([*launcher, "-m", "cancernet", *args], cwd=ROOT, env=python_env(),
                          capture_output=True, text=True, timeout=600)


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


def test_submission_follows_the_ids_file_order(synth_root, ckpt, tmp_path):
    chosen = _some_ids(synth_root)
    chosen[["id"]].assign(label=0).to_csv(tmp_path / "ids.csv", index=False)
    out = tmp_path / "submission.csv"
    proc = cli("predict", "--checkpoint", str(ckpt), "--images", str(synth_root / "train"),
               "--ids", str(tmp_path / "ids.csv"), "--out", str(out), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    sub = pd.read_csv(out, dtype={"id": str})
    assert list(sub.columns) == ["id", "label"]
    assert sub["id"].tolist() == chosen["id"].tolist()
    assert sub["label"].between(0, 1).all() and sub["label"].nunique() > 2  # probabilities


def test_predict_a_whole_folder_of_png_and_tif(synth_root, ckpt, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    chosen = _some_ids(synth_root, 6)["id"].tolist()
    for k, i in enumerate(chosen):
        from PIL import Image
        Image.fromarray(read_patch(synth_root / "train" / f"{i}.tif")).save(folder / f"{i}.{'png' if k % 2 else 'tif'}")
    out = tmp_path / "sub.csv"
    assert cli("predict", "--checkpoint", str(ckpt), "--images", str(folder), "--out", str(out),
               "--device", "cpu").returncode == 0
    assert sorted(pd.read_csv(out, dtype={"id": str})["id"]) == sorted(chosen)


def test_torchrun_predict_matches_single_process(synth_root, ckpt, tmp_path):
    chosen = _some_ids(synth_root, 50, seed=1)
    chosen[["id"]].to_csv(tmp_path / "ids.csv", index=False)
    outs = {}
    for name, launcher in (("single", (sys.executable,)),
                           ("ddp", (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))):
        outs[name] = tmp_path / f"{name}.csv"
        proc = cli("predict", "--checkpoint", str(ckpt), "--images", str(synth_root / "train"), "--ids",
                   str(tmp_path / "ids.csv"), "--out", str(outs[name]), "--device", "cpu", launcher=launcher)
        assert proc.returncode == 0, proc.stderr[-2000:]
    single, ddp = (pd.read_csv(outs[k], dtype={"id": str}) for k in ("single", "ddp"))
    assert ddp["id"].tolist() == single["id"].tolist() == chosen["id"].tolist()
    assert np.allclose(ddp["label"], single["label"], atol=1e-5)


def test_tta_and_target_sensitivity_operating_point(synth_root, run_dir, ckpt, tmp_path):
    proc = cli("evaluate", "--run", str(run_dir), "--tta", "--target-sensitivity", "0.95")
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    assert metrics["tta"]["roc_auc"] >= metrics["roc_auc"] - 0.002
    chosen = metrics["target_sensitivity"]
    assert chosen["chosen_on"] == "val" and chosen["val"]["sensitivity"] >= 0.95
    val = pd.read_csv(run_dir / "predictions" / "val.csv")
    assert (val["prob"][val["label"] == 1] >= chosen["val"]["threshold"]).mean() >= 0.95
    point = torch.load(ckpt, weights_only=True)["operating_point"]
    assert point == {"threshold": chosen["val"]["threshold"], "method": "target_sensitivity",
                     "target": 0.95, "chosen_on": "val"}
    # predict labels patches at that operating point
    ids = _some_ids(synth_root, 30, seed=2)
    ids[["id"]].to_csv(tmp_path / "ids.csv", index=False)
    probs_out, labels_out = tmp_path / "p.csv", tmp_path / "l.csv"
    base = ("predict", "--checkpoint", str(ckpt), "--images", str(synth_root / "train"), "--ids",
            str(tmp_path / "ids.csv"), "--device", "cpu")
    assert cli(*base, "--out", str(probs_out)).returncode == 0
    assert cli(*base, "--out", str(labels_out), "--threshold-from-checkpoint").returncode == 0
    probs, labels = pd.read_csv(probs_out), pd.read_csv(labels_out)
    assert set(labels["label"]) <= {0, 1}
    assert (labels["label"] == (probs["label"] >= point["threshold"] - 1e-6).astype(int)).all()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_export_gives_the_checkpoints_outputs(synth_root, ckpt, tmp_path):
    proc = cli("export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "export"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    ids = _some_ids(synth_root, 12, seed=3)["id"].tolist()
    paths = [synth_root / "train" / f"{i}.tif" for i in ids]
    model, cfg, _ = load_model(ckpt, torch.device("cpu"))
    expected = predict_folder(model, cfg, DistInfo(), paths, 8, 0, tta=False, amp="off")
    scripted = torch.jit.load(str(tmp_path / "export" / "model.ts"))
    program = torch.export.load(str(tmp_path / "export" / "model.pt2")).module()
    batch = torch.from_numpy(np.stack([read_patch(p) for p in paths]))  # uint8 NHWC
    with torch.no_grad():
        assert np.allclose(scripted(batch).numpy(), expected, atol=1e-5)
        assert np.allclose(program(batch).numpy(), expected, atol=1e-5)
    weights = torch.load(tmp_path / "export" / "weights.pt", weights_only=True)
    model.load_state_dict(weights)  # plain state dict of the same architecture
    info = json.loads((tmp_path / "export" / "model.json").read_text())
    assert info["arch"] == "resnet18" and info["image_size"] == 48


def test_missing_image_is_a_clear_error_and_nothing_is_written(synth_root, ckpt, tmp_path):
    pd.DataFrame({"id": ["f" * 40]}).to_csv(tmp_path / "ids.csv", index=False)
    out = tmp_path / "sub.csv"
    proc = cli("predict", "--checkpoint", str(ckpt), "--images", str(synth_root / "train"),
               "--ids", str(tmp_path / "ids.csv"), "--out", str(out))
    assert proc.returncode == 2 and "f" * 40 in proc.stderr and "not found" in proc.stderr
    assert not out.exists()


def test_unreadable_image_is_a_clear_error(synth_root, ckpt, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "broken.tif").write_bytes(b"II*\x00garbage")
    proc = cli("predict", "--checkpoint", str(ckpt), "--images", str(folder), "--out", str(tmp_path / "s.csv"))
    assert proc.returncode == 2 and "broken.tif" in proc.stderr
    assert not (tmp_path / "s.csv").exists()


def test_corrupt_checkpoint_is_a_clear_error(synth_root, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    proc = cli("predict", "--checkpoint", str(bad), "--images", str(synth_root / "train"), "--out",
               str(tmp_path / "s.csv"))
    assert proc.returncode == 2 and str(bad) in proc.stderr and "corrupt" in proc.stderr


def test_checkpoint_of_another_arch_is_a_clear_error(synth_root, ckpt, tmp_path):
    state = torch.load(ckpt, weights_only=True)
    state["config"]["model"]["arch"] = "resnet34"  # weights of a resnet18, config says resnet34
    wrong = tmp_path / "wrong.pt"
    torch.save(state, wrong)
    proc = cli("export", "--checkpoint", str(wrong), "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "does not fit" in proc.stderr and "resnet34" in proc.stderr
