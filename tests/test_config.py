import re
import subprocess
import sys

import pytest
import yaml

from cancernet.config import ConfigError, load_config, resolved_yaml

from conftest import CONFIGS, ROOT, python_env

SHIPPED = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
# settings that name a place or a project rather than change what runs
NAMES = {"data.root", "train.out_dir", "wandb.project"}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load_with_every_value_they_set(name):
    """No key of a shipped config is silently dropped, renamed or converted to something else."""
    written = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    loaded = load_config(CONFIGS / f"{name}.yaml").to_dict()
    for section, values in written.items():
        for key, value in values.items():
            got = loaded[section][key]
            assert got == (float(value) if isinstance(got, float) else value), f"{section}.{key}"


def test_every_setting_a_shipped_config_changes_is_exercised_by_some_test():
    """A guard: each key a shipped recipe sets away from its default is set by some test too (so
    that a test can fail when that setting silently stops working)."""
    from cancernet.config import Config

    defaults = Config().to_dict()
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("*.py"))
    missing = set()
    for name in SHIPPED:
        for section, values in yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()).items():
            for key, value in values.items():
                setting = f"{section}.{key}"
                # as an override (section.key=value) or as a dataclass argument (key=value)
                exercised = f"{setting}=" in tests or re.search(rf"\b{key}=", tests)
                if value != defaults[section][key] and setting not in NAMES and not exercised:
                    missing.add(f"{setting} ({name})")
    assert not missing, sorted(missing)


def test_seed_config_is_the_original_recipe():
    cfg = load_config(CONFIGS / "seed_frozen.yaml")
    assert (cfg.model.arch, cfg.model.pretrained, cfg.model.freeze_backbone, cfg.model.head) == (
        "resnet34",
        "imagenet",
        True,
        "seed",
    )
    assert (cfg.optim.name, cfg.optim.lr, cfg.train.batch_size, cfg.train.epochs) == ("adam", 3e-4, 32, 10)
    assert (cfg.data.image_size, cfg.data.augment) == (224, "seed")


def test_overrides_are_yaml_scalars_and_later_ones_win():
    cfg = load_config(
        CONFIGS / "cpu_test.yaml",
        [
            "train.epochs=7",
            "optim.lr=1e-2",
            "data.limit=null",
            "train.epochs=9",
            "model.freeze_backbone=true",
            "train.clip_grad=1",
        ],
    )
    assert cfg.train.epochs == 9 and cfg.optim.lr == 0.01 and cfg.data.limit is None
    assert cfg.model.freeze_backbone is True and cfg.train.clip_grad == 1.0


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.epoch=3", "train.epoch"),
        ("trian.epochs=3", "trian"),
        ("train.epochs=three", "train.epochs"),
        ("train.epochs=1.5", "train.epochs"),
        ("model.freeze_backbone=maybe", "model.freeze_backbone"),
        ("train.amp=fp8", "train.amp"),
        ("model.arch=vgg17", "model.arch"),
        ("data.mean=0.5", "data.mean"),
        ("train.grad_accum=0", "train.grad_accum"),
        ("train.sync_every=0", "train.sync_every"),
        ("data.limit=0", "data.limit"),
        ("data.test_fraction=0", "data.test_fraction"),
        ("data.val_fraction=0", "data.val_fraction"),
        ("data.val_fraction=0.9", "data.val_fraction"),
        ("train.ema_decay=1.0", "train.ema_decay"),
        ("optim.label_smoothing=-0.1", "optim.label_smoothing"),
        ("train.time_budget=5d", "train.time_budget"),
        ("train.time_budget=0", "train.time_budget"),
        ("train.time_budget=fast", "train.time_budget"),
        ("model.compile_scope=outer", "model.compile_scope"),
    ],
)
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(CONFIGS / "cpu_test.yaml", [override])


@pytest.mark.parametrize("text", ["- data\n- model\n", "just a string\n", "42\n"])
def test_a_config_file_that_is_not_a_mapping_is_a_clear_error(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"{path} must hold a mapping of sections"):
        load_config(path)


def test_pcam_refuses_split_fractions_it_would_ignore():
    with pytest.raises(ConfigError, match="'data.val_fraction' does not apply to data.format=pcam"):
        load_config(CONFIGS / "cpu_test.yaml", ["data.format=pcam", "data.val_fraction=0.2"])


def test_yaml_off_and_on_mean_the_words_for_switches():
    cfg = load_config(CONFIGS / "cpu_test.yaml", ["train.amp=off", "train.progress=on"])
    assert (cfg.train.amp, cfg.train.progress) == ("off", "on")


def test_unknown_key_in_file_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 2\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="'train.lr'"):
        load_config(path)


def test_resolved_config_round_trips_with_provenance(tmp_path):
    cfg = load_config(CONFIGS / "demo.yaml", ["train.epochs=3"])
    text = resolved_yaml(cfg, world_size=4)
    meta = yaml.safe_load(text)["meta"]
    assert meta["world_size"] == 4 and meta["torch"]
    assert "git_commit" in meta
    (tmp_path / "config.yaml").write_text(text)
    assert load_config(tmp_path / "config.yaml") == cfg


def test_cli_reports_a_bad_key_in_one_line_and_exits_nonzero():
    out = subprocess.run(
        [sys.executable, "train_ddp.py", "--config", "configs/cpu_test.yaml", "train.epohcs=2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=python_env(),
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]  # one line, no traceback
    assert "train.epohcs" in out.stderr


@pytest.mark.parametrize("value, seconds", [("90s", 90), ("14m", 840), ("4h", 14400), ("1h30m", 5400), ("600", 600)])
def test_a_time_budget_reads_as_a_duration(value, seconds):
    from cancernet.config import parse_duration

    cfg = load_config(CONFIGS / "cpu_test.yaml", [f"train.time_budget={value}"])
    assert parse_duration(cfg.train.time_budget) == seconds


# Every key that acts on both kinds of run (patches, and slides under model.mil); the keys that act
# on one kind only are config.ONE_KIND's. A new key fails the first test until it is placed.
BOTH = {
    *("data.num_workers", "data.val_fraction", "data.test_fraction", "data.folds", "data.fold", "data.split_seed"),
    "model.mil",
    *("optim.name", "optim.lr", "optim.lr_scale", "optim.max_lr", "optim.base_batch", "optim.weight_decay"),
    *("optim.decay_norm_bias", "optim.momentum", "optim.schedule", "optim.warmup_epochs"),
    *(
        "train.epochs",
        "train.steps",
        "train.patience",
        "train.grad_accum",
        "train.clip_grad",
        "train.amp",
        "train.deterministic",
    ),
    *("train.time_budget", "train.checkpoint_every", "train.select_metric", "train.ema_decay", "train.ema_warmup"),
    *("train.device", "train.out_dir", "train.resume", "train.overwrite", "train.seed", "train.eval_every"),
    *("train.log_every", "train.sync_every", "train.progress"),
    "dist.backend",
    "dist.timeout_min",
    *("wandb.mode", "wandb.project", "wandb.entity", "wandb.name", "wandb.tags", "wandb.log_model"),
    "wandb.init_timeout",
    *("report.bootstrap", "report.calibrate", "report.figures"),
}
# a value other than the default for each key of one kind (as an override)
OTHER_VALUE = {
    **{
        "data.root": "elsewhere",
        "data.format": "packed",
        "data.packed_dir": "pack",
        "data.stage_dir": "/tmp/stage",
        "data.image_size": "192",
        "data.crop": "64",
        "data.limit": "100",
        "data.groups_csv": "groups.csv",
        "data.split_by": "pcam",
        "data.on_bad_image": "skip",
        "data.verify_ids": "off",
        "data.mpp": "0.5",
        "data.mean": "[0.5,0.5,0.5]",
        "data.std": "[0.2,0.2,0.2]",
        "data.augment": "none",
        "data.jitter": "0.2",
        "data.hue": "0.05",
        "data.stain": "hed",
        "data.stain_sigma": "0.1",
        "data.stain_bias": "0.02",
    },
    **{
        "model.arch": "resnet18",
        "model.pretrained": "none",
        "model.weights_url": "/mirror",
        "model.freeze_backbone": "true",
        "model.head": "seed",
        "model.channels_last": "false",
        "model.compile": "true",
        "model.compile_scope": "ddp",
        "model.sync_bn": "true",
    },
    **{"optim.label_smoothing": "0.1", "optim.head_lr_mult": "10", "optim.layer_decay": "0.7"},
    **{"train.batch_size": "64", "train.eval_batch_size": "64", "train.feature_cache": "on"},
    "train.feature_cache_dir": "/tmp/cache",
    **{
        "slide.stride": "64",
        "slide.tissue_mpp": "4",
        "slide.min_saturation": "0.1",
        "slide.min_texture": "5",
        "slide.fill_holes_um2": "1000",
        "slide.min_tissue": "0.5",
        "slide.block": "4",
        "slide.top_k": "5",
        "slide.score": "max",
    },
    **{"data.features": "feats", "data.slides_csv": "labels.csv", "data.max_instances": "512"},
}
KIND_BASE = {"patch": [], "slide": ["model.mil=abmil"]}


def test_every_config_key_acts_on_both_kinds_of_run_or_is_refused_where_it_does_not():
    """The table of where each key acts, checked against the config's sections: a key set on a
    kind of run that ignores it (data.augment on a slide-level run, data.features on a patch run)
    is refused in one line naming it, and accepted on the kind it acts on."""
    import dataclasses

    from cancernet.config import KIND_NAMES, ONE_KIND, Config

    config = Config()
    keys = {
        f"{s.name}.{f.name}" for s in dataclasses.fields(config) for f in dataclasses.fields(getattr(config, s.name))
    }
    assert not BOTH & set(ONE_KIND)
    assert keys == BOTH | set(ONE_KIND), sorted(keys ^ (BOTH | set(ONE_KIND)))
    assert set(OTHER_VALUE) == set(ONE_KIND)
    for key, (kind, _) in ONE_KIND.items():
        other = "slide" if kind == "patch" else "patch"
        override = f"{key}={OTHER_VALUE[key]}"
        assert load_config(None, [*KIND_BASE[kind], override]) is not None  # it acts here
        with pytest.raises(
            ConfigError, match=rf"config key '{key}' does not apply to a {re.escape(KIND_NAMES[other])}"
        ):
            load_config(None, [*KIND_BASE[other], override])


def test_the_shipped_slide_level_config_sets_only_keys_a_slide_level_run_reads():
    from cancernet.config import SLIDE, task_kind

    assert task_kind(load_config(CONFIGS / "mil.yaml")) == SLIDE
    with pytest.raises(ConfigError, match="'optim.momentum' acts with optim.name=sgd only"):
        load_config(CONFIGS / "mil.yaml", ["optim.momentum=0.5"])


def test_a_length_in_steps_and_in_epochs_at_once_is_refused():
    with pytest.raises(ConfigError, match="'train.steps' and 'train.epochs' are both set"):
        load_config(None, ["train.steps=100", "train.epochs=5"])


def test_loader_workers_follow_the_cores_when_the_config_does_not_say(monkeypatch):
    """configs/mil.yaml leaves data.num_workers unset: one worker per core of this process's share
    of the node, less one for the rank (torch warns when a config asks for more than there are)."""
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert load_config(CONFIGS / "mil.yaml").data.num_workers == 7
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four ranks on the node: two cores each
    assert load_config(CONFIGS / "mil.yaml").data.num_workers == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert load_config(CONFIGS / "mil.yaml").data.num_workers == 0
    assert load_config(CONFIGS / "mil.yaml", ["data.num_workers=3"]).data.num_workers == 3  # said: kept
