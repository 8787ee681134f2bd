"""The leak audit: patches whose pixels are in more than one split, slides in more than one split."""

import json

import pandas as pd
import pytest

from cancernet.config import DataConfig
from cancernet.data.formats import prepare
from cancernet.data.synthetic_pcam import write_pcam_release
from cancernet.evaluate.audit import describe, leak_audit


def test_the_audit_counts_what_crosses_splits():
    table = pd.DataFrame(
        {
            "id": list("abcdef"),
            "split": ["train", "test", "val", "train", "train", "test"],
            "group": ["s1", "s1", "s2", "s2", "s3", "s4"],
        }
    )
    hashes = pd.Series({"a": "h1", "b": "h1", "c": "h2", "d": "h3", "e": "h3", "f": "h4"})
    audit = leak_audit(table, hashes, "test")
    assert audit["duplicate_patches"] == 2  # b repeats a, e repeats d
    assert audit["patches_whose_pixels_are_in_several_splits"] == 2  # a and b; d and e share train
    assert audit["slides_in_several_splits"] == 2 and audit["patches_of_such_slides"] == 4  # s1, s2
    assert "2 of 6 patches" in describe(audit) and "2 of 4 slides" in describe(audit)


@pytest.mark.slow
def test_a_pcam_run_reports_the_release_duplicates_that_cross_its_splits(tmp_path):
    from conftest import train

    root = tmp_path / "release"
    counts = write_pcam_release(root, 200, 60, 60, seed=5, per_slide=10, chunk=50, duplicates=0.05, workers=2)
    prepare(DataConfig(root=str(root), format="pcam"), workers=2)
    out = tmp_path / "run"
    train(root, out, "data.format=pcam", "train.epochs=1", "data.image_size=32")
    audit = json.loads((out / "report" / "metrics.json").read_text())["leak_audit"]
    assert audit["hashes_from"] == "the pack's record" and audit["duplicate_patches"] == counts["duplicates"] > 0
    # PCam's splits are slide-disjoint, but its duplicate patches cross them anyway
    assert audit["patches_whose_pixels_are_in_several_splits"] > 0 and audit["slides_in_several_splits"] == 0
    # the command gives the same, and writes it beside the report
    import sys

    from cancernet.cli import main

    argv, sys.argv = sys.argv, ["cancernet", "audit", str(out)]
    try:
        assert main() == 0
    finally:
        sys.argv = argv
    assert json.loads((out / "report" / "audit.json").read_text()) == audit
