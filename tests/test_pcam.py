"""PatchCamelyon's HDF5 release layout: synth, prepare, train, evaluate; bad releases."""

import gzip
import json

import h5py
import numpy as np
import pandas as pd
import pytest

from cancernet.config import DataConfig
from cancernet.data.formats import open_source_pack as open_pack
from cancernet.data.formats import prepare
from cancernet.data.pcam import SOURCE as PCAM
from cancernet.data.pcam import SizedGzip
from cancernet.data.synthetic_pcam import write_pcam_release as write_release
from cancernet.runtime.errors import DataError

from conftest import train

STEM = "camelyonpatch_level_2_split"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A gzipped synthetic release (as PCam is distributed), prepared."""
    root = tmp_path_factory.mktemp("pcam")
    write_release(root, 300, 80, 80, seed=2, gzip_files=True, workers=2, per_slide=10)
    prepare(DataConfig(root=str(root), format="pcam"), workers=2)
    return root


def test_synth_writes_the_release_layout(tmp_path):
    write_release(tmp_path, 30, 10, 10, seed=0, per_slide=5)
    for split, n in (("train", 30), ("valid", 10), ("test", 10)):
        with h5py.File(tmp_path / f"{STEM}_{split}_x.h5") as fx, h5py.File(tmp_path / f"{STEM}_{split}_y.h5") as fy:
            assert fx["x"].shape == (n, 96, 96, 3) and fx["x"].dtype == np.uint8
            assert fy["y"].shape == (n, 1, 1, 1) and set(np.unique(fy["y"][:])) <= {0, 1}
        meta = pd.read_csv(tmp_path / f"{STEM}_{split}_meta.csv", index_col=0)
        assert list(meta.columns) == ["coord_y", "coord_x", "tumor_patch", "center_tumor_patch", "wsi"]
        assert len(meta) == n and meta["wsi"].nunique() == n // 5


def test_prepare_packs_every_split_with_its_slide(release):
    cfg = DataConfig(root=str(release), format="pcam")
    pack = open_pack(cfg)
    table = PCAM.table(cfg, pack)
    assert table["split"].value_counts().to_dict() == {"train": 300, "val": 80, "test": 80}
    for split, ours in (("train", "train"), ("valid", "val"), ("test", "test")):
        with (
            gzip.open(release / f"{STEM}_{split}_x.h5.gz") as g,
            h5py.File(g) as fx,
            gzip.open(release / f"{STEM}_{split}_y.h5.gz") as gy,
            h5py.File(gy) as fy,
        ):
            for row in (0, 7, len(fy["y"]) - 1):
                image_id = f"{ours}_{row:06d}"
                assert np.array_equal(pack.read_by_id(image_id), fx["x"][row])
                assert pack.labels[pack.row_of[image_id]] == fy["y"][row, 0, 0, 0]
        meta = pd.read_csv(release / f"{STEM}_{split}_meta.csv", index_col=0)
        part = table[table["split"] == ours]
        assert part["group"].tolist() == meta["wsi"].tolist()
    assert not set(table[table["split"] == "train"]["group"]) & set(table[table["split"] == "test"]["group"])


def test_a_gzipped_file_opens_without_decompressing_all_of_it(release):
    """HDF5 asks for the file's size on open; answering by decompressing the whole stream cost
    a minute per open on the 7 GB train split."""
    path = release / f"{STEM}_train_x.h5.gz"
    with SizedGzip(path) as g, h5py.File(g, "r") as f:
        assert f["x"].shape == (300, 96, 96, 3)
        first = f["x"][:2]
        consumed = g.fileobj.tell()  # compressed bytes read so far
    assert consumed < path.stat().st_size / 4
    with gzip.open(path) as plain, h5py.File(plain, "r") as f:
        assert np.array_equal(f["x"][:2], first)
    with SizedGzip(path) as g:
        assert g.size == len(gzip.decompress(path.read_bytes()))


def test_data_limit_takes_every_split_in_proportion(release):
    cfg = DataConfig(root=str(release), format="pcam", limit=92)
    table = PCAM.table(cfg, open_pack(cfg))
    assert table["split"].value_counts().to_dict() == {"train": 60, "val": 16, "test": 16}


@pytest.mark.slow
def test_train_and_evaluate_on_the_release_splits(release, tmp_path):
    out = tmp_path / "run"
    train(release, out, "data.format=pcam", "train.epochs=2", "data.image_size=32")
    splits = pd.read_csv(out / "splits.csv")
    assert (splits["split"] == splits["id"].str.split("_").str[0]).all()  # the release's, not drawn ones
    assert splits["split"].value_counts().to_dict() == {"train": 300, "val": 80, "test": 80}
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    test_slides = pd.read_csv(release / f"{STEM}_test_meta.csv", index_col=0)["wsi"].nunique()
    assert metrics["groups"]["n_groups"] == test_slides and 0 <= metrics["groups"]["roc_auc_max"] <= 1
    assert "slide-level ROC AUC" in (out / "report" / "index.html").read_text()


def _small_release(root):
    write_release(root, 20, 10, 10, seed=1, per_slide=5)
    return root


def _rewrite(path, name, data):
    path.unlink()
    with h5py.File(path, "w") as f:
        f.create_dataset(name, data=data)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", "split_valid_y.h5 \\(or .h5.gz\\) is missing"),
        ("shape", "split_train_x.h5: dataset 'x' is uint8 \\(20, 64, 64, 3\\)"),
        ("dtype", "split_train_x.h5: dataset 'x' is float32"),
        ("length", "split_test_x.h5 holds 10 patches but camelyonpatch_level_2_split_test_y.h5 9 labels"),
        ("label", "split_train_y.h5: row 3 has label 2"),
        ("meta", "split_valid_meta.csv: 9 rows"),
        ("truncated", "split_train_x.h5.gz: cannot be read .*truncated"),
    ],
)
def test_a_bad_release_gives_one_clear_error_naming_the_file(tmp_path, damage, message):
    root = _small_release(tmp_path / "release")
    if damage == "missing":
        (root / f"{STEM}_valid_y.h5").unlink()
    elif damage == "shape":
        _rewrite(root / f"{STEM}_train_x.h5", "x", np.zeros((20, 64, 64, 3), np.uint8))
    elif damage == "dtype":
        _rewrite(root / f"{STEM}_train_x.h5", "x", np.zeros((20, 96, 96, 3), np.float32))
    elif damage == "length":
        _rewrite(root / f"{STEM}_test_y.h5", "y", np.zeros((9, 1, 1, 1), np.uint8))
    elif damage == "label":
        labels = np.zeros((20, 1, 1, 1), np.uint8)
        labels[3] = 2
        _rewrite(root / f"{STEM}_train_y.h5", "y", labels)
    elif damage == "meta":
        meta = pd.read_csv(root / f"{STEM}_valid_meta.csv", index_col=0)
        meta.head(9).to_csv(root / f"{STEM}_valid_meta.csv")
    elif damage == "truncated":
        plain = root / f"{STEM}_train_x.h5"
        data = gzip.compress(plain.read_bytes(), compresslevel=1)
        (root / f"{STEM}_train_x.h5.gz").write_bytes(data[: len(data) // 2])
        plain.unlink()
    with pytest.raises(DataError, match=message):
        prepare(DataConfig(root=str(root), format="pcam"), workers=1)
    assert not (root / "packed").exists() and not (root / "packed.partial").exists()  # nothing half-written
