"""Slide-aware Kaggle data: ids that verify their pixels, link-pcam recovering each patch's slide
from the PCam release, and PCam's splits for Kaggle patches (data/link.py, data/kaggle.py)."""

import hashlib
import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cancernet.config import DataConfig
from cancernet.data.kaggle import find_bad_images, image_path
from cancernet.data.link import link_pcam
from cancernet.data.patch import read_patch
from cancernet.data.synthetic_pcam import write_pcam_release
from cancernet.runtime.errors import DataError

from conftest import ROOT, copy_dataset, make_cfg

FIXTURE = ROOT / "tests" / "fixtures" / "pcam_real"


@pytest.fixture(scope="module")
def linked(tmp_path_factory):
    base = tmp_path_factory.mktemp("link")
    counts = write_pcam_release(
        base / "release",
        240,
        60,
        60,
        seed=3,
        per_slide=12,
        chunk=40,
        duplicates=0.04,
        kaggle=base / "kaggle",
        workers=2,
    )
    summary = link_pcam(base / "kaggle", base / "release", workers=2)
    return base, counts, summary


def _truth(release):
    """hash -> [(split, slide)] of every release row, read independently with h5py and hashlib."""
    out = {}
    for split in ("train", "valid", "test"):
        x = h5py.File(release / f"camelyonpatch_level_2_split_{split}_x.h5")["x"][:]
        wsi = pd.read_csv(release / f"camelyonpatch_level_2_split_{split}_meta.csv")["wsi"]
        for patch, slide in zip(x, wsi):
            out.setdefault(hashlib.sha1(patch.tobytes()).hexdigest(), []).append((split, slide))
    return out


def test_link_pcam_recovers_every_slide_invents_none_and_reports_duplicates(linked):
    base, counts, summary = linked
    truth = _truth(base / "release")
    labelled = pd.read_csv(base / "kaggle" / "train_labels.csv", dtype={"id": str})
    linked_ids = pd.read_csv(base / "kaggle" / "pcam_slides.csv", dtype={"id": str})
    # every labelled Kaggle patch, and nothing else (not Kaggle's unlabelled test patches)
    assert sorted(linked_ids["id"]) == sorted(labelled["id"]) and summary["unmatched"] == 0
    order = {"test": 0, "valid": 1, "train": 2}
    for row in linked_ids.itertuples():
        places = truth[row.id]
        assert (row.pcam_split, row.group) == min(places, key=lambda p: order[p[0]])  # the most held-out copy
    duplicated = sum(len(v) - 1 for v in truth.values())
    assert summary["release_duplicate_rows"] == duplicated == counts["duplicates"] > 0
    several_slides = sum(1 for i in labelled["id"] if len({s for _, s in truth[i]}) > 1)
    assert summary["kaggle_ids_on_several_slides"] == several_slides
    assert json.loads((base / "kaggle" / "pcam_slides.json").read_text())["matched"] == len(labelled)


def test_pcam_splits_for_kaggle_patches_come_from_the_link(linked):
    from cancernet.engine.loaders import load_table
    from cancernet.runtime.distributed import DistInfo

    base, _, _ = linked
    cfg = make_cfg(base / "kaggle", "x", f"data.groups_csv={base / 'kaggle' / 'pcam_slides.csv'}", "data.split_by=pcam")
    table, _ = load_table(cfg, DistInfo())
    link = pd.read_csv(base / "kaggle" / "pcam_slides.csv", dtype={"id": str}).set_index("id")
    expected = link["pcam_split"].map({"train": "train", "valid": "val", "test": "test"})
    assert (table.set_index("id")["split"] == expected.reindex(table["id"])).all()
    with pytest.raises(DataError, match="data.split_by=pcam needs data.groups_csv from .*link-pcam"):
        load_table(make_cfg(base / "kaggle", "x", "data.split_by=pcam"), DistInfo())


def test_the_real_fixtures_ids_are_the_sha1_of_their_pixels():
    labels = pd.read_csv(FIXTURE / "train_labels.csv", dtype={"id": str})
    assert find_bad_images(FIXTURE, labels["id"].tolist(), verify=True) == {}
    for i in labels["id"]:
        assert hashlib.sha1(read_patch(image_path(FIXTURE, i)).tobytes()).hexdigest() == i


def test_a_patch_altered_after_download_is_caught_by_the_reader_and_by_prepare(tmp_path):
    from cancernet.data.formats import prepare

    root = copy_dataset(FIXTURE, tmp_path / "copy")
    victim = pd.read_csv(root / "train_labels.csv", dtype={"id": str})["id"].iloc[3]
    pixels = read_patch(image_path(root, victim))
    pixels[50, 50] = 255 - pixels[50, 50]  # one pixel changed: a re-saved, edited or mixed-up file
    Image.fromarray(pixels).save(image_path(root, victim), format="TIFF")
    ids = pd.read_csv(root / "train_labels.csv", dtype={"id": str})["id"].tolist()
    assert list(find_bad_images(root, ids, verify=True)) == [victim]
    assert "do not hash to its id" in find_bad_images(root, ids, verify=True)[victim]
    assert find_bad_images(root, ids, verify=False) == {}  # data.verify_ids=off
    with pytest.raises(DataError, match=f"{victim}.*do not hash to its id"):
        prepare(DataConfig(root=str(root)), workers=1)
    shutil.rmtree(root / "packed.partial", ignore_errors=True)
    prepare(DataConfig(root=str(root), on_bad_image="skip"), workers=1)
    from cancernet.data.formats import open_source_pack

    assert list(open_source_pack(DataConfig(root=str(root))).bad_images) == [victim]


def test_verify_ids_on_refuses_ids_that_are_not_hashes(synth_root):
    from cancernet.data.kaggle import verifies_ids

    assert verifies_ids("auto", ["a" * 40, "0" * 40]) and not verifies_ids("auto", ["a" * 40, "case-7"])
    with pytest.raises(DataError, match="'case-7' is not a SHA-1"):
        verifies_ids("on", ["a" * 40, "case-7"])
    assert not verifies_ids("off", ["a" * 40])
    synth_ids = pd.read_csv(synth_root / "train_labels.csv", dtype={"id": str})["id"].head(30).tolist()
    assert find_bad_images(synth_root, synth_ids, verify=True) == {}  # synthetic sets are named like Kaggle's
    assert np.array_equal(read_patch(image_path(synth_root, synth_ids[0])).shape, (96, 96, 3))
