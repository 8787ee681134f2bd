"""train.feature_cache: a frozen backbone's features computed once and stored (features.py)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from cancernet.config import ModelConfig
from cancernet.data.stored import open_store
from cancernet.models.classifier import build_model
from cancernet.runtime.errors import ConfigError
from cancernet.train import features

from conftest import make_cfg, train

PROBE = (
    "model.arch=resnet18",
    "model.freeze_backbone=true",
    "data.augment=dihedral",
    "data.jitter=0",
    "data.hue=0",
    "data.limit=200",
    "train.epochs=2",
    "train.seed=4",
    "optim.lr=0.01",
)


def backbone_file(path, seed):
    torch.manual_seed(seed)
    torch.save(build_model(ModelConfig(arch="resnet18", pretrained="none"), 32).net.state_dict(), path)
    return path


def test_auto_caches_only_what_can_be_stored_and_on_says_why_it_cannot(synth_root):
    assert features.decide(make_cfg(synth_root, "x", *PROBE)) == (True, "frozen backbone, 8 view(s) per image")
    used, why = features.decide(make_cfg(synth_root, "x", *PROBE, "data.stain=hed"))
    assert not used and "data.stain=hed" in why
    assert not features.decide(make_cfg(synth_root, "x", *PROBE, "model.freeze_backbone=false"))[0]
    with pytest.raises(ConfigError, match="'train.feature_cache': on, but data.augment=seed"):
        features.decide(make_cfg(synth_root, "x", *PROBE, "data.augment=seed", "train.feature_cache=on"))


@pytest.mark.parametrize(
    "change", ["data.image_size=64", "data.crop=64", "data.augment=none", "data.mean=[0.5,0.5,0.5]"]
)
def test_a_store_is_never_reused_for_other_inputs_or_another_view_set(synth_root, change):
    """Stored features are what the backbone gave for one preprocessing and one set of views: a run
    at another size, crop, normalisation, or with one view instead of the 8 dihedral ones (silently
    unaugmented training) must get a store of its own."""
    model = build_model(ModelConfig(arch="resnet18", pretrained="none", freeze_backbone=True), 48)
    ids = [f"{i:040x}" for i in range(10)]
    base = make_cfg(synth_root, "x", *PROBE, "data.image_size=48", "data.std=[0.2,0.2,0.2]", "data.mean=[0.4,0.4,0.4]")
    other = make_cfg(
        synth_root, "x", *PROBE, "data.image_size=48", "data.std=[0.2,0.2,0.2]", "data.mean=[0.4,0.4,0.4]", change
    )
    assert features.fingerprint(base, model, ids)[0] == features.fingerprint(base, model, ids)[0]
    assert features.fingerprint(other, model, ids)[0] != features.fingerprint(base, model, ids)[0]


@pytest.mark.slow
def test_a_cached_run_equals_an_uncached_one_and_a_new_backbone_gets_a_new_store(synth_root, tmp_path, caplog):
    import logging

    weights = backbone_file(tmp_path / "a.pt", 0)
    common = (*PROBE, f"model.pretrained={weights}", f"train.feature_cache_dir={tmp_path / 'cache'}")
    train(synth_root, tmp_path / "uncached", *common, "train.feature_cache=off")
    with caplog.at_level(logging.INFO):
        train(synth_root, tmp_path / "cached", *common, "train.feature_cache=on")
    assert "feature cache: 200 images x 8 views x 512 features" in caplog.text
    a, b = (pd.read_csv(tmp_path / run / "summary.csv") for run in ("uncached", "cached"))
    # float16 storage moves the features by ~1e-3: losses agree to that, an AUC to one swapped pair
    for column in ("train_loss", "train_acc", "val_loss"):
        assert a[column].to_numpy() == pytest.approx(b[column].to_numpy(), abs=2e-3), column
    assert a["val_auc"].to_numpy() == pytest.approx(b["val_auc"].to_numpy(), abs=1 / 150)
    ma, mb = (json.loads((tmp_path / run / "report" / "metrics.json").read_text()) for run in ("uncached", "cached"))
    assert ma["roc_auc"] == pytest.approx(mb["roc_auc"], abs=1 / 150) and ma["n"] == mb["n"]
    assert ma["brier"] == pytest.approx(mb["brier"], abs=2e-3)
    # another seed on the same backbone reuses the store; another backbone file gets its own
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train(synth_root, tmp_path / "seed5", *common, "train.seed=5", "train.epochs=1")
    assert "feature cache: reusing" in caplog.text
    other = backbone_file(tmp_path / "b.pt", 1)
    train(synth_root, tmp_path / "other", *common, f"model.pretrained={other}", "train.epochs=1")
    assert len(list((tmp_path / "cache").iterdir())) == 2


def _fill(rank, world, init, cfg, table, results):
    from cancernet.runtime.distributed import DistInfo

    tdist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.data.image_size)
        store = features.build_store(cfg, DistInfo(rank=rank, world_size=world), model, table)
        results[rank] = str(store.path)
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_fill_one_store_with_every_row_once(synth_root, tmp_path):
    from cancernet.data.kaggle import read_labels

    cfg = make_cfg(synth_root, "x", *PROBE, f"train.feature_cache_dir={tmp_path / 'cache'}", "data.limit=30")
    table = read_labels(synth_root, 30)
    results = mp.Manager().dict()
    mp.spawn(_fill, args=(2, str(tmp_path / "init"), cfg, table, results), nprocs=2, join=True)
    store = open_store(tmp_path / "cache" / results[0].split("/")[-1])
    assert results[0] == results[1] and len(store.ids) == 30 and store.views == 8
    with open(store.path / "features.npy", "rb") as f:
        stored = store.read_rows(np.arange(30), f.fileno())
    # one process, the same images, computed directly: every row is there, and is its own image's
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.image_size).eval()
    from cancernet.data.augment import Preprocess, dihedral
    from cancernet.data.kaggle import image_path
    from cancernet.data.patch import read_patch

    images = torch.from_numpy(np.stack([read_patch(image_path(synth_root, i)) for i in store.ids])).permute(0, 3, 1, 2)
    with torch.no_grad():
        for k in (0, 5):
            view = Preprocess.from_config(cfg.data)(dihedral(images, torch.full((30,), k)))
            expected = features.embed(model, view).numpy()
            assert np.allclose(stored[:, k].astype(np.float32), expected, rtol=2e-3, atol=2e-3), k
