import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from cancernet.config import DataConfig
from cancernet.data.augment import Preprocess
from cancernet.data.datasets import FolderDataset, PackedDataset
from cancernet.data.formats import open_source_pack as open_pack
from cancernet.data.formats import prepare
from cancernet.data.patch import read_patch
from cancernet.runtime.errors import ConfigError, DataError, UserError

from conftest import ROOT, python_env, train
from conftest import copy_dataset as _copy


def test_pack_holds_every_patch_as_decoded(packed_root):
    pack = open_pack(DataConfig(root=str(packed_root)))
    manifest = json.loads((packed_root / "packed" / "manifest.json").read_text())
    labels = pd.read_csv(packed_root / "train_labels.csv", dtype={"id": str})
    assert manifest["count"] == len(labels) == len(pack.ids) and manifest["shape"] == [96, 96, 3]
    assert pack.ids == labels["id"].tolist() and (pack.labels == labels["label"]).all()
    for image_id in labels["id"].sample(20, random_state=0):
        assert np.array_equal(pack.read_by_id(image_id), read_patch(packed_root / "train" / f"{image_id}.tif"))
    assert not (packed_root / "packed.partial").exists()


def test_packed_and_folder_datasets_give_the_same_uint8_batches(packed_root):
    cfg = DataConfig(root=str(packed_root), image_size=64)
    ids = pd.read_csv(packed_root / "train_labels.csv", dtype={"id": str})["id"][:16].tolist()
    labels = np.zeros(16, dtype=np.int64)
    paths = [packed_root / "train" / f"{i}.tif" for i in ids]
    folder = torch.stack([FolderDataset(paths, labels)[i][0] for i in range(16)])
    images, _, index = PackedDataset(open_pack(cfg), ids, labels)[list(range(16))]
    assert images.dtype == folder.dtype == torch.uint8 and index.tolist() == list(range(16))
    assert torch.equal(images, folder)
    assert Preprocess.from_config(cfg)(images).shape == (16, 3, 64, 64)


def test_a_partial_pack_is_never_used_and_prepare_restarts(synth_root, tmp_path):
    root = _copy(synth_root, tmp_path / "d", n=40)
    (root / "packed.partial").mkdir()
    (root / "packed.partial" / "images.npy").write_bytes(b"half written")
    with pytest.raises(DataError, match="no complete pack.*prepare"):
        open_pack(DataConfig(root=str(root)))
    prepare(DataConfig(root=str(root)), workers=1)
    assert len(open_pack(DataConfig(root=str(root))).ids) == 40
    assert not (root / "packed.partial").exists()


def test_pack_of_another_labels_csv_is_refused(synth_root, tmp_path):
    root = _copy(synth_root, tmp_path / "d", n=40)
    prepare(DataConfig(root=str(root)), workers=1)
    labels = pd.read_csv(root / "train_labels.csv", dtype={"id": str})
    labels.assign(label=1 - labels["label"]).to_csv(root / "train_labels.csv", index=False)
    with pytest.raises(DataError, match="different .*train_labels.csv.*re-run prepare"):
        open_pack(DataConfig(root=str(root)))


@pytest.mark.slow
def test_bad_image_fails_prepare_or_is_skipped_and_listed(synth_root, tmp_path):
    root = _copy(synth_root, tmp_path / "d", n=40)
    bad = pd.read_csv(root / "train_labels.csv", dtype={"id": str})["id"][3]
    path = root / "train" / f"{bad}.tif"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match=str(path)):
        prepare(DataConfig(root=str(root)), workers=1)
    assert not (root / "packed").exists() and not (root / "packed.partial").exists()
    prepare(DataConfig(root=str(root), on_bad_image="skip"), workers=1)
    assert list(open_pack(DataConfig(root=str(root))).bad_images) == [bad]
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="cannot fill one global batch of 32"):  # 28 training images
        train(root, out, "data.format=packed", "data.on_bad_image=skip", "train.epochs=1")
    train(root, out, "data.format=packed", "data.on_bad_image=skip", "train.epochs=1", "train.batch_size=8")
    assert pd.read_csv(out / "bad_images.csv", dtype={"id": str})["id"].tolist() == [bad]
    with pytest.raises(DataError, match=bad):  # a training run that does not allow skipping
        train(root, tmp_path / "run2", "data.format=packed", "train.epochs=1", "train.batch_size=8")


@pytest.mark.slow
def test_packed_training_learns_as_well_as_folder(packed_root, tmp_path):
    aucs = {}
    for fmt in ("folder", "packed"):
        train(packed_root, tmp_path / fmt, f"data.format={fmt}", "train.epochs=2")
        aucs[fmt] = json.loads((tmp_path / fmt / "report" / "metrics.json").read_text())["roc_auc"]
    assert min(aucs.values()) > 0.9, aucs
    assert abs(aucs["folder"] - aucs["packed"]) < 0.05, aucs


@pytest.mark.slow
def test_packed_mid_epoch_resume_is_exact(packed_root, tmp_path):
    from conftest import RESUME_COMMON, assert_same_run, train_stopping

    common = (*RESUME_COMMON, "data.format=packed")
    train(packed_root, tmp_path / "full", *common)
    assert train_stopping(packed_root, tmp_path / "resumed", after_syncs=5, overrides=common) == "stopped"
    train(packed_root, tmp_path / "resumed", *common)
    assert_same_run(tmp_path / "full", tmp_path / "resumed")


@pytest.mark.slow
def test_bench_prints_one_json_line_per_measurement(packed_root):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cancernet",
            "bench",
            "data",
            "--config",
            "configs/cpu_test.yaml",
            f"data.root={packed_root}",
            "--steps",
            "3",
        ],
        cwd=ROOT,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["path"], r["augmented"]) for r in rows] == [
        ("folder", False),
        ("folder", True),
        ("packed", False),
        ("packed", True),
    ]
    assert all(r["images_per_s"] > 0 and r["images"] == 96 for r in rows)


def test_the_pack_is_staged_once_per_node_reused_and_read_from_there(synth_root, tmp_path, caplog):
    import logging
    import threading

    from cancernet.config import DataConfig
    from cancernet.data.formats import open_source_pack, prepare
    from cancernet.data.packed import stage

    from conftest import copy_dataset

    root = copy_dataset(synth_root, tmp_path / "data", n=60)
    prepare(DataConfig(root=str(root)), workers=1)
    cfg, local = DataConfig(root=str(root), format="packed"), tmp_path / "node-local"
    pack = open_source_pack(cfg)
    first_id = pack.ids[0]
    original = pack.read_by_id(first_id)
    paths, start = [], threading.Barrier(3)

    def rank():  # the ranks of one node, all at once: one copies, the others wait and reuse it
        start.wait()
        paths.append(stage(pack, local))

    with caplog.at_level(logging.INFO, logger="cancernet.data.packed"):
        threads = [threading.Thread(target=rank) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(set(paths)) == 1 and paths[0].parent == local
        assert caplog.text.count("staged the pack") == 1
        for name in ("images.npy", "ids.txt", "labels.npy", "manifest.json"):
            assert (paths[0] / name).read_bytes() == (pack.path / name).read_bytes()
        # reads go to the staged copy: blank the shared one (same size, same manifest) and read again
        images = pack.path / "images.npy"
        images.write_bytes(images.read_bytes()[: pack.offset] + bytes(images.stat().st_size - pack.offset))
        staged_cfg = DataConfig(root=str(root), format="packed", stage_dir=str(local))
        assert np.array_equal(open_source_pack(staged_cfg).read_by_id(first_id), original) and original.any()
        assert not open_source_pack(cfg).read_by_id(first_id).any()
        assert caplog.text.count("staged the pack") == 1  # reused
        labels = pd.read_csv(root / "train_labels.csv", dtype={"id": str})
        labels.head(50).to_csv(root / "train_labels.csv", index=False)
        prepare(DataConfig(root=str(root)), workers=1)  # other data, a new pack: staged anew, beside the old
        fresh = open_source_pack(staged_cfg)
        assert fresh.path.parent == local and fresh.path != paths[0] and len(fresh.ids) == 50
        assert np.array_equal(fresh.read_by_id(first_id), original)
        assert caplog.text.count("staged the pack") == 2
    out = tmp_path / "run"
    train(root, out, "data.format=packed", f"data.stage_dir={local}", "train.epochs=1")
    assert (out / "checkpoints" / "last.pt").is_file()


def test_a_shared_memory_too_small_for_the_loader_workers_is_said_in_one_line(tmp_path):
    from cancernet.engine.loaders import shared_memory_shortfall

    assert shared_memory_shortfall(27_648 * 256, 6, 4, 4, str(tmp_path)) is None  # a disk: room enough
    line = shared_memory_shortfall(2**40, 6, 4, 4, str(tmp_path))
    assert "4 rank(s) x 6 loader workers x 4 batches" in line and "--shm-size" in line and "\n" not in line
    assert shared_memory_shortfall(1, 1, 1, 1, str(tmp_path / "missing")) is None


def test_loader_workers_are_sent_the_rows_they_read_not_the_packs_id_list(packed_root):
    import pickle

    pack = open_pack(DataConfig(root=str(packed_root), format="packed"))
    few = PackedDataset(pack, pack.ids[:10], np.zeros(10, np.int64))
    # each worker of each loader gets a pickled copy: 220K ids were ~13 MB, the rows 8 bytes each
    assert len(pickle.dumps(few)) < len(pickle.dumps(pack.ids)) / 4
    restored = pickle.loads(pickle.dumps(few))
    images, labels, index = restored[[0, 3]]
    assert torch.equal(images, PackedDataset(pack, pack.ids, pack.labels)[[0, 3]][0])


def test_a_run_refused_at_its_start_names_what_to_do_and_leaves_no_files(synth_root, tmp_path):
    """data.format=packed before `prepare`, or weights that are not there: one line saying what to
    do, and nothing written to the run directory (no splits.csv for a run that never started)."""
    root = _copy(synth_root, tmp_path / "d", n=40)
    out = tmp_path / "run"
    with pytest.raises(
        DataError,
        match=rf"no complete pack at .*: run `python -m cancernet prepare data.root={root} data.format=packed`",
    ):
        train(root, out, "data.format=packed", "train.batch_size=8")
    assert not (out / "splits.csv").exists() and not (out / "checkpoints").exists()
    with pytest.raises(UserError, match="model.pretrained: .*missing.pt does not exist"):  # weights not there
        train(root, out, "train.batch_size=8", f"model.pretrained={tmp_path / 'missing.pt'}")
    assert not (out / "splits.csv").exists()
