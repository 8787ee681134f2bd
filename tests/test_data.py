import dataclasses
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cancernet.config import DataConfig
from cancernet.data.augment import Augment, Preprocess
from cancernet.data.kaggle import read_labels
from cancernet.data.patch import read_patch
from cancernet.data.splits import make_splits
from cancernet.data.synthetic import render_patch
from cancernet.runtime.errors import DataError

from conftest import train


@pytest.fixture
def root(synth_root, tmp_path):
    """A private copy of 60 labelled images that a test may damage."""
    labels = pd.read_csv(synth_root / "train_labels.csv", dtype={"id": str}).head(60)
    (tmp_path / "train").mkdir()
    for i in labels["id"]:
        shutil.copy(synth_root / "train" / f"{i}.tif", tmp_path / "train")
    labels.to_csv(tmp_path / "train_labels.csv", index=False)
    return tmp_path


def test_synth_writes_the_kaggle_layout(synth_root):
    labels = pd.read_csv(synth_root / "train_labels.csv", dtype={"id": str})
    assert list(labels.columns) == ["id", "label"] and len(labels) == 400
    assert labels["id"].str.fullmatch(r"[0-9a-f]{40}").all()
    assert 0.3 < labels["label"].mean() < 0.5
    sub = pd.read_csv(synth_root / "sample_submission.csv", dtype={"id": str})
    assert len(sub) == 20 and all((synth_root / "test" / f"{i}.tif").is_file() for i in sub["id"])
    image = Image.open(synth_root / "train" / f"{labels['id'][0]}.tif")
    assert (image.size, image.mode, image.format) == ((96, 96), "RGB", "TIFF")


def test_synthetic_label_lives_in_the_centre():
    """Tumour nuclei (dark pixels) touch the centre 32x32 in positives, never in negatives.

    Some positives hold one faint tumour nucleus (the hard cases), so the rule holds for most.
    """
    rng = np.random.default_rng(0)

    def dark(img):
        return (img.sum(-1) < 330).any()

    pos = [render_patch(rng, 1) for _ in range(100)]
    outside = [render_patch(rng, 0, outside_tumour=True) for _ in range(100)]
    normal = [render_patch(rng, 0) for _ in range(100)]
    assert np.mean([dark(p[32:64, 32:64]) for p in pos]) > 0.9
    assert not any(dark(p[32:64, 32:64]) for p in outside + normal)
    assert np.mean([dark(p) for p in outside]) > 0.9  # their border holds tumour-like cells


def test_missing_root_names_it(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        read_labels(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "csv, message",
    [
        ("id,label\naaa,0\naaa,1\n", "duplicate id 'aaa'"),
        ("id,label\naaa,0\n,1\n", "row 3 has an empty id"),
        ("id,label\naaa,0\nbbb,2\n", "'bbb' has label"),
        ("id,label\naaa,0\nbbb,\n", "'bbb' has label"),
        ("id,target\naaa,0\n", "missing column"),
        ("id,label\naaa,0\n../../etc/passwd,1\n", "row 3 has id '../../etc/passwd'.*plain file name"),
        ("id,label\n/abs/path,0\n", "row 2 has id '/abs/path'"),
        ("id,label\n..,0\n", "row 2 has id '..'"),
    ],
)
def test_bad_labels_csv(tmp_path, csv, message):
    (tmp_path / "train_labels.csv").write_text(csv)
    with pytest.raises(DataError, match=message):
        read_labels(tmp_path)


def _damage(root, kind):
    first = pd.read_csv(root / "train_labels.csv", dtype={"id": str})["id"][0]
    path = root / "train" / f"{first}.tif"
    if kind == "missing":
        path.unlink()
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "size":
        Image.new("RGB", (64, 64)).save(path, format="TIFF")
    elif kind == "mode":
        Image.new("L", (96, 96)).save(path, format="TIFF")
    return first, path


@pytest.mark.parametrize(
    "kind, reason",
    [("missing", "missing"), ("truncated", "cannot be decoded"), ("size", "64x64"), ("mode", "mode is L")],
)
@pytest.mark.slow
def test_bad_image_fails_naming_it(root, tmp_path, kind, reason):
    _, path = _damage(root, kind)
    with pytest.raises(DataError, match=reason) as err:
        train(root, tmp_path / "run", "train.epochs=1")
    assert str(path) in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing half-written


@pytest.mark.slow
def test_bad_image_skip_lists_it(root, tmp_path):
    bad_id, _ = _damage(root, "truncated")
    train(root, tmp_path / "run", "train.epochs=1", "data.on_bad_image=skip")
    listed = pd.read_csv(tmp_path / "run" / "bad_images.csv", dtype={"id": str})
    assert listed["id"].tolist() == [bad_id]
    splits = pd.read_csv(tmp_path / "run" / "splits.csv", dtype={"id": str})
    assert bad_id not in set(splits["id"]) and len(splits) == 59


def test_read_patch_returns_exactly_the_pixels_written(tmp_path):
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "p.tif", format="TIFF")
    arr = read_patch(tmp_path / "p.tif")
    assert arr.dtype == np.uint8 and np.array_equal(arr, pixels)  # not transposed, no channel swap


def _frame(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"id": [f"{i:040x}" for i in range(n)], "label": (rng.random(n) < 0.4).astype(int)})


def test_splits_are_stratified_seeded_and_sized():
    frame = _frame()
    a = make_splits(frame, 0.15, 0.15, seed=3)
    assert a.equals(make_splits(frame, 0.15, 0.15, seed=3))
    assert not a["split"].equals(make_splits(frame, 0.15, 0.15, seed=4)["split"])
    fractions = a["split"].value_counts(normalize=True)
    assert fractions["test"] == pytest.approx(0.15, abs=0.01) and fractions["val"] == pytest.approx(0.15, abs=0.01)
    rates = a.groupby("split")["label"].mean()
    assert (rates - frame["label"].mean()).abs().max() < 0.02


def test_groups_never_span_two_splits():
    frame = _frame(2000)
    groups = pd.Series([f"slide{i % 97}" for i in range(2000)], index=frame["id"])
    split = make_splits(frame, 0.15, 0.15, seed=0, groups=groups)
    per_group = split.assign(group=groups.to_numpy()).groupby("group")["split"].nunique()
    assert (per_group == 1).all()
    assert set(split["split"]) == {"train", "val", "test"}


def test_limit_takes_the_first_rows(synth_root):
    assert (
        read_labels(synth_root, limit=25)["id"].tolist()
        == pd.read_csv(synth_root / "train_labels.csv", dtype={"id": str})["id"][:25].tolist()
    )


def _batch(n=6):
    rng = np.random.default_rng(0)
    return torch.from_numpy(np.stack([render_patch(rng, i % 2) for i in range(n)])).permute(0, 3, 1, 2).contiguous()


def _augment(cfg, x, epoch=0, seed=0):
    return Augment(cfg, seed)(x, torch.arange(len(x)), epoch)


def test_dihedral_augment_keeps_pixels_and_the_centre():
    cfg = DataConfig(augment="dihedral", jitter=0.0, hue=0.0, mean=[0, 0, 0], std=[1, 1, 1])
    x = _batch()
    back = (_augment(cfg, x) * 255).round().to(torch.uint8)
    for a, b in zip(x, back):  # a flip/rotation: same pixels, same centre 32x32 content
        assert torch.equal(a.flatten().sort().values, b.flatten().sort().values)
        assert torch.equal(a[:, 32:64, 32:64].flatten().sort().values, b[:, 32:64, 32:64].flatten().sort().values)
    assert not torch.equal(x, back)


def test_augment_is_seeded_per_image_and_evaluation_is_deterministic():
    cfg = DataConfig(image_size=64, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    x = _batch()
    a = _augment(cfg, x, epoch=5)
    assert torch.equal(a, _augment(cfg, x, epoch=5))
    assert not torch.equal(a, _augment(cfg, x, epoch=6))
    assert not torch.equal(a, _augment(cfg, x, epoch=5, seed=1))
    # image i's augmentation does not depend on which other images share its batch
    assert torch.allclose(Augment(cfg, 0)(x[2:4], torch.arange(2, 4), 5), a[2:4], atol=1e-6)
    e = Preprocess.from_config(cfg)(x)
    assert e.shape == (6, 3, 64, 64)
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    assert torch.allclose(
        e.mean((0, 2, 3)),
        ((x.float() / 255 - mean) / torch.tensor(cfg.std).view(1, 3, 1, 1)).mean((0, 2, 3)),
        atol=0.02,
    )


def test_colour_jitter_changes_colour_not_geometry():
    cfg = DataConfig(augment="none", jitter=0.3, hue=0.05, mean=[0, 0, 0], std=[1, 1, 1])
    x = _batch()
    y = _augment(cfg, x, epoch=1)
    assert 0 <= y.min() and y.max() <= 1
    for a, b in zip(x.float().mean(1), y.mean(1)):  # per image: same structure, other colours
        assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.9
    assert not torch.allclose(x.float() / 255, y, atol=0.02)


def test_hed_stain_augmentation_recolours_each_pixel_in_place():
    cfg = DataConfig(
        augment="none",
        jitter=0.0,
        hue=0.0,
        stain="hed",
        stain_sigma=0.2,
        stain_bias=0.02,
        mean=[0, 0, 0],
        std=[1, 1, 1],
    )
    x = _batch()
    y = _augment(cfg, x, epoch=3)
    assert 0 <= y.min() and y.max() <= 1 and not torch.allclose(x.float() / 255, y, atol=0.01)
    # a per-pixel colour map: the centre 32x32 (the label's region) depends only on its own pixels
    border_changed = x.clone()
    border_changed[:, :, :16] = 255 - border_changed[:, :, :16]
    z = _augment(cfg, border_changed, epoch=3)
    assert torch.allclose(z[:, :, 32:64, 32:64], y[:, :, 32:64, 32:64], atol=1e-6)
    for a, b in zip(x.float().mean(1), y.mean(1)):  # structure kept
        assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.9
    # no change at all when the stain scales are 1 and the shifts 0
    identity = DataConfig(
        augment="none", jitter=0.0, hue=0.0, stain="hed", stain_sigma=0.0, stain_bias=0.0, mean=[0, 0, 0], std=[1, 1, 1]
    )
    assert torch.allclose(_augment(identity, x), x.float() / 255, atol=1e-4)


def test_folder_and_packed_paths_augment_an_image_identically(packed_root):
    from cancernet.data.datasets import to_device
    from cancernet.engine.loaders import make_loader, set_epoch
    from cancernet.runtime.distributed import DistInfo

    from conftest import make_cfg

    table = read_labels(packed_root).assign(split="train").head(64)
    batches = {}
    for fmt in ("folder", "packed"):
        cfg = make_cfg(
            packed_root, "unused", f"data.format={fmt}", "data.stain=hed", "data.image_size=48", "train.batch_size=16"
        )
        split = make_loader(cfg, DistInfo(), table, train=True)
        set_epoch(split, 2)
        images, labels, index = to_device(next(iter(split.loader)), torch.device("cpu"))
        batches[fmt] = (index, split.augment(images, index, 2))
    assert torch.equal(batches["folder"][0], batches["packed"][0])
    assert torch.allclose(batches["folder"][1], batches["packed"][1], atol=1e-6)


def test_seed_augment_rotates_by_its_drawn_angle_flips_by_its_draw_and_resizes():
    from cancernet.data.augment import FLIP, ROTATE, _rotate_resize, sample_uniforms

    x = _batch().float() / 255
    # the resampling itself: a quarter turn is rot90 (counter-clockwise on screen), a flip is a mirror
    turned = _rotate_resize(x, torch.full((6,), 90.0), torch.zeros(6, dtype=torch.bool), 96)
    assert torch.allclose(turned[:, :, 1:-1, 1:-1], torch.rot90(x, 1, dims=(-2, -1))[:, :, 1:-1, 1:-1], atol=1e-5)
    mirrored = _rotate_resize(x, torch.zeros(6), torch.ones(6, dtype=torch.bool), 96)
    assert torch.allclose(mirrored, x.flip(-1), atol=1e-5)
    # the augmentation: each patch is turned by its own drawn angle in [-10, 10] and flipped by its draw
    cfg = DataConfig(augment="seed", image_size=224, jitter=0.0, hue=0.0, mean=[0, 0, 0], std=[1, 1, 1])
    y = _augment(cfg, _batch(), epoch=3)
    u = sample_uniforms(torch.arange(6), 0, 3)
    angles, flips = 20 * u[:, ROTATE] - 10, u[:, FLIP] < 0.5
    assert y.shape == (6, 3, 224, 224) and angles.abs().max() <= 10 and 0 < flips.sum() < 6
    assert torch.allclose(y, _rotate_resize(x, angles, flips, 224), atol=1e-6)
    assert (y - _rotate_resize(x, torch.zeros(6), flips, 224)).abs().mean() > 0.01  # it did rotate


def test_centre_crop_keeps_the_labelled_centre_at_full_resolution():
    cfg = DataConfig(image_size=64, crop=64, mean=[0, 0, 0], std=[1, 1, 1])
    x = _batch()
    assert torch.equal(Preprocess.from_config(cfg)(x), x[:, :, 16:80, 16:80].float() / 255)
    nhwc = Preprocess.from_config(cfg, nhwc=True)(x.permute(0, 2, 3, 1).contiguous())  # export's layout
    assert torch.equal(nhwc, x[:, :, 16:80, 16:80].float() / 255)
    # a dihedral view of the whole patch, cropped, is the same view of the crop: the centre stays the centre
    aug = Augment(
        DataConfig(image_size=64, crop=64, augment="dihedral", jitter=0.0, hue=0.0, mean=[0, 0, 0], std=[1, 1, 1]), 0
    )(x, torch.arange(6), 0)
    for a, b in zip(aug, x[:, :, 16:80, 16:80]):
        assert torch.equal((a * 255).round().to(torch.uint8).flatten().sort().values, b.flatten().sort().values)


def test_evaluation_batches_have_eval_batch_size(synth_root):
    from cancernet.engine.loaders import make_loader
    from cancernet.runtime.distributed import DistInfo

    from conftest import make_cfg

    cfg = make_cfg(synth_root, "unused", "train.eval_batch_size=7", "train.batch_size=5")
    part = read_labels(synth_root).head(20)
    loader = make_loader(cfg, DistInfo(), part, train=False).loader
    assert [len(batch[1]) for batch in loader] == [7, 7, 6]  # every image once, none dropped


def test_k_fold_partitions_train_and_val_keeps_groups_whole_and_the_test_split_fixed():
    frame = _frame(600, seed=2)
    groups = pd.Series([f"slide{i // 8:03d}" for i in range(600)], index=frame["id"])
    runs = [make_splits(frame, 0.15, 0.2, 7, groups, folds=4, fold=k) for k in range(4)]
    test = [set(r.loc[r["split"] == "test", "id"]) for r in runs]
    assert all(t == test[0] for t in test) and len(test[0]) == pytest.approx(120, abs=16)
    vals = [set(r.loc[r["split"] == "val", "id"]) for r in runs]
    rest = set(frame["id"]) - test[0]
    assert set().union(*vals) == rest and sum(len(v) for v in vals) == len(rest)  # every image validates once
    table = runs[0].assign(group=groups.reindex(runs[0]["id"]).to_numpy())
    assert table.groupby("group")["fold"].nunique().max() == 1  # no slide in two folds
    assert (table.groupby("group")["split"].nunique() == 1).all() and set(table["fold"]) == {-1, 0, 1, 2, 3}
    positive = [r.loc[r["split"] == "val", "label"].mean() for r in runs]
    assert max(positive) - min(positive) < 0.1  # stratified
    ungrouped = make_splits(frame, 0.15, 0.2, 7, folds=3, fold=1)
    assert set(ungrouped["fold"]) == {-1, 0, 1, 2} and (ungrouped["split"] == "val").sum() == pytest.approx(160, abs=3)


def test_a_fold_outside_the_folds_or_a_val_fraction_with_folds_is_refused(synth_root):
    from cancernet.runtime.errors import ConfigError

    from conftest import make_cfg

    with pytest.raises(ConfigError, match="'data.fold': 3 is not one of the 3 folds"):
        make_cfg(synth_root, "x", "data.folds=3", "data.fold=3")
    with pytest.raises(ConfigError, match="'data.val_fraction' does not apply"):
        make_cfg(synth_root, "x", "data.folds=3", "data.val_fraction=0.2")


def _reference_augment(cfg: DataConfig, images: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
    """The augmentation as it was written on the device, op by op (before its parameters moved
    to the host): what the fused version must still compute."""
    import math

    from cancernet.data import augment as a

    u = a.sample_uniforms(index, 0, epoch)
    x = Preprocess.from_config(cfg).unit(a.dihedral(images, (u[:, a.DIHEDRAL] * 8).long()))
    x = Preprocess.from_config(cfg).resize(x)
    hed_from_rgb = torch.linalg.inv(a._RGB_FROM_HED)
    alpha = 1 + cfg.stain_sigma * (2 * u[:, a.STAIN_SCALE] - 1)
    beta = cfg.stain_bias * (2 * u[:, a.STAIN_SHIFT] - 1)
    matrix = (hed_from_rgb * alpha[:, None, :]) @ a._RGB_FROM_HED
    offset = a._LOG_EPS * beta @ a._RGB_FROM_HED
    x = (torch.einsum("nchw,ncd->ndhw", x.clamp_min(1e-6).log(), matrix) + offset[:, :, None, None]).exp().clamp(0, 1)
    j = cfg.jitter
    b, c, s = (1 - j + 2 * j * u[:, k] for k in (a.BRIGHTNESS, a.CONTRAST, a.SATURATION))
    angle = (2 * u[:, a.HUE] - 1) * cfg.hue * 2 * math.pi
    sat = s.view(-1, 1, 1) * torch.eye(3) + (1 - s).view(-1, 1, 1) * a._GRAY.view(1, 1, 3)
    rot = torch.zeros(len(u), 3, 3)
    rot[:, 0, 0], rot[:, 1, 1], rot[:, 2, 2], rot[:, 1, 2], rot[:, 2, 1] = (
        1,
        angle.cos(),
        angle.cos(),
        -angle.sin(),
        angle.sin(),
    )
    matrix = c.view(-1, 1, 1) * b.view(-1, 1, 1) * (torch.linalg.inv(a._RGB2YIQ) @ rot @ a._RGB2YIQ @ sat)
    mean_gray = torch.einsum("nchw,c->n", x, a._GRAY) / (x.shape[-1] * x.shape[-2])
    x = (torch.einsum("nij,njhw->nihw", matrix, x) + ((1 - c) * b * mean_gray).view(-1, 1, 1, 1)).clamp(0, 1)
    return Preprocess.from_config(cfg).normalise(x)


@pytest.mark.parametrize("size", [96, 64])
def test_augmentation_with_host_drawn_parameters_computes_what_the_device_version_did(size):
    from cancernet.data.augment import host_uniforms, sample_uniforms

    index = torch.arange(1000, 1032)
    assert torch.equal(torch.from_numpy(host_uniforms(index, 5, 7)), sample_uniforms(index, 5, 7))  # bit for bit
    cfg = DataConfig(image_size=size, augment="dihedral", stain="hed", stain_sigma=0.05, stain_bias=0.01, jitter=0.1)
    cfg = dataclasses.replace(cfg, hue=0.02)
    images = torch.randint(0, 256, (32, 96, 96, 3), dtype=torch.uint8).permute(0, 3, 1, 2)  # NHWC-strided, as loaded
    for epoch in (0, 4):
        fused = Augment(cfg, 0)(images, index, epoch)
        # float32 products in another order: last-bit differences of values of order 1
        assert torch.allclose(fused, _reference_augment(cfg, images, index, epoch), atol=2e-5)
