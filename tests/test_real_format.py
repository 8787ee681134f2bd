"""Genuine PCam/Kaggle patches (tests/fixtures/pcam_real, CC0): every reader gets their exact pixels."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from cancernet.config import DataConfig
from cancernet.data.datasets import FolderDataset
from cancernet.data.formats import open_source_pack as open_pack
from cancernet.data.formats import prepare
from cancernet.data.patch import read_patch

FIXTURE = Path(__file__).parent / "fixtures" / "pcam_real"


@pytest.fixture(scope="module")
def real_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pcam_real")
    shutil.copytree(FIXTURE / "train", root / "train")
    shutil.copy(FIXTURE / "train_labels.csv", root / "train_labels.csv")
    prepare(DataConfig(root=str(root)), workers=1)
    return root


def _ids():
    return pd.read_csv(FIXTURE / "train_labels.csv", dtype={"id": str})["id"].tolist()


def test_the_folder_reader_decodes_real_tiffs_exactly_as_tifffile():
    for image_id in _ids():
        path = FIXTURE / "train" / f"{image_id}.tif"
        expected = tifffile.imread(path)
        assert expected.shape == (96, 96, 3) and expected.dtype == np.uint8
        assert np.array_equal(read_patch(path), expected)
        image, _, _ = FolderDataset([path], None)[0]
        assert torch.equal(image, torch.from_numpy(expected).permute(2, 0, 1))


def test_prepare_packs_real_patches_byte_for_byte(real_root):
    pack = open_pack(DataConfig(root=str(real_root)))
    for image_id in _ids():
        assert np.array_equal(pack.read_by_id(image_id), tifffile.imread(real_root / "train" / f"{image_id}.tif"))


@pytest.mark.slow
def test_train_and_predict_read_real_patches(real_root, tmp_path):
    from cancernet.engine.inference import Predictor
    from cancernet.evaluate.patch_predict import predict_folder
    from cancernet.runtime.distributed import DistInfo

    from conftest import train

    out = tmp_path / "run"
    # 20 patches: a smoke run of the real format end to end, not an accuracy measurement
    assert (
        train(
            real_root,
            out,
            "data.format=packed",
            "train.epochs=1",
            "train.batch_size=8",
            "data.val_fraction=0.3",
            "data.test_fraction=0.3",
            "data.image_size=48",
        )
        == "done"
    )
    predictor = Predictor.load(out / "checkpoints" / "best.pt", DistInfo())
    paths = [real_root / "train" / f"{i}.tif" for i in _ids()]
    probs = predict_folder(predictor, paths, 8, 0)
    assert probs.shape == (20,) and np.isfinite(probs).all()
