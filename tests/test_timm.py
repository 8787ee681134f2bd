"""timm and Hugging Face Hub backbones, offline, on files the tests make: a weights file, a local
Hugging Face cache with a model's config.json, the known pathology models' construction."""

import json
import subprocess
import sys

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from cancernet.config import ModelConfig
from cancernet.models.archs import HUB_MODELS, hub_model
from cancernet.models.classifier import build_model
from cancernet.models.timm import TimmBackbone
from cancernet.runtime.errors import ConfigError, UserError

from conftest import CONFIGS, ROOT, python_env

REV = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(
    tmp_path,
    repo="org/tiny-path",
    arch="vit_tiny_patch16_224",
    size=32,
    mean=(0.7, 0.6, 0.7),
    std=(0.2, 0.25, 0.15),
    weights=True,
):
    """HF_HOME with one model as the Hub serves it to timm: config.json (+ model.safetensors)."""
    home = tmp_path / "hf"
    folder = home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / REV
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(REV)
    model = timm.create_model(arch, num_classes=0, img_size=size)
    config = {
        "architecture": arch,
        "num_classes": 0,
        "num_features": model.num_features,
        "model_args": {"img_size": size},
        "pretrained_cfg": {
            "input_size": [3, size, size],
            "mean": list(mean),
            "std": list(std),
            "fixed_input_size": True,
            "classifier": "head",
        },
    }
    (snapshot / "config.json").write_text(json.dumps(config))
    if weights:
        save_file(model.state_dict(), snapshot / "model.safetensors")
    return home, model


def offline(monkeypatch, home):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)


def test_weights_from_a_safetensors_file_load_into_the_backbone(tmp_path):
    donor = timm.create_model("resnet10t", num_classes=0)
    save_file(donor.state_dict(), tmp_path / "w.safetensors")
    model = build_model(ModelConfig(arch="timm:resnet10t", pretrained=str(tmp_path / "w.safetensors")), 32)
    assert torch.equal(model.net.backbone.model.conv1[0].weight, donor.conv1[0].weight)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 2)
    # a file of another architecture is one clear line
    save_file(timm.create_model("resnet14t", num_classes=0).state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="does not fit timm:resnet10t: mismatched"):
        build_model(ModelConfig(arch="timm:resnet10t", pretrained=str(tmp_path / "other.safetensors")), 32)


def test_a_hub_model_comes_from_the_offline_cache_with_its_weights(tmp_path, monkeypatch):
    home, donor = hub_cache(tmp_path)
    offline(monkeypatch, home)
    model = build_model(ModelConfig(arch="hf-hub:org/tiny-path", pretrained="hub", channels_last=False), 32)
    for name, tensor in donor.state_dict().items():
        assert torch.equal(model.net.backbone.model.state_dict()[name], tensor), name


def test_a_hub_model_missing_from_an_offline_cache_says_how_to_fetch_it(tmp_path, monkeypatch):
    home, _ = hub_cache(tmp_path, weights=False)
    offline(monkeypatch, home)
    with pytest.raises(UserError, match="not in the Hugging Face cache.*fetch-weights --arch hf-hub:org/tiny-path"):
        build_model(ModelConfig(arch="hf-hub:org/tiny-path", pretrained="hub"), 32)
    with pytest.raises(UserError, match="fetch-weights --arch hf-hub:org/absent"):
        build_model(ModelConfig(arch="hf-hub:org/absent", pretrained="hub"), 32)


def test_a_timm_name_is_checked_and_close_names_suggested():
    from cancernet.models.archs import check_arch

    assert check_arch("timm:vit_small_patch16_224.augreg_in21k") == "timm:vit_small_patch16_224.augreg_in21k"
    with pytest.raises(ConfigError, match="'model.arch'.*not a timm model.*did you mean timm:resnet18"):
        check_arch("timm:resnet18x")
    with pytest.raises(ConfigError, match="hf-hub:ORG/NAME"):
        check_arch("hf-hub:no-organisation")


def test_virchow_pooling_is_the_class_token_beside_the_mean_of_the_patch_tokens():
    assert (
        hub_model("hf-hub:paige-ai/Virchow2").pool == "cls+mean"
        and hub_model("hf-hub:paige-ai/Virchow2").prefix_tokens == 5
    )
    assert HUB_MODELS["mahmoodlab/uni"].kwargs == {"init_values": 1e-5, "dynamic_img_size": True}
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, reg_tokens=4).eval()
    backbone = TimmBackbone(vit, "cls+mean", prefix_tokens=5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = vit.forward_features(x)
        expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1)
        assert backbone.num_features == 2 * 192 and torch.allclose(backbone(x), expected)


@pytest.mark.slow
def test_a_run_on_a_hub_model_takes_its_preprocessing_from_the_weights(synth_root, tmp_path):
    """Through the CLI, as on a compute node: HF_HOME and HF_HUB_OFFLINE=1 in the environment."""
    home, _ = hub_cache(tmp_path, size=32, mean=(0.7, 0.6, 0.7), std=(0.2, 0.25, 0.15))
    out = tmp_path / "run"
    env = {**python_env(), "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "train_ddp.py",
            "--config",
            str(CONFIGS / "cpu_test.yaml"),
            f"data.root={synth_root}",
            f"train.out_dir={out}",
            "model.arch=hf-hub:org/tiny-path",
            "model.pretrained=hub",
            "data.image_size=null",
            "data.limit=80",
            "train.epochs=1",
            "model.freeze_backbone=true",
            "train.feature_cache=off",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = yaml.safe_load((out / "config.yaml").read_text())["data"]
    assert (data["mean"], data["std"], data["image_size"]) == ([0.7, 0.6, 0.7], [0.2, 0.25, 0.15], 32)
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    assert best["preprocess"]["source"].startswith("data.mean/std/image_size from timm's pretrained config")
