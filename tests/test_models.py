import hashlib
import http.server
import threading
import types
from functools import partial

import pytest
import torch

from cancernet import models
from cancernet.config import ModelConfig
from cancernet.errors import UserError
from cancernet.models import build_model, count_parameters


def test_seed_head_on_frozen_resnet34_trains_65922_parameters():
    """The original recipe's number: only the head (512->128->2) learns."""
    model = build_model(ModelConfig(arch="resnet34", pretrained="none", head="seed", freeze_backbone=True))
    trainable, total = count_parameters(model)
    assert trainable == 65_922 and total > 21_000_000
    head = model.net.fc
    assert [type(m).__name__ for m in head] == ["Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert (head[0].p, head[3].p, head[1].out_features, head[4].out_features) == (0.5, 0.3, 128, 2)


def test_frozen_backbone_batchnorm_stays_in_eval_mode():
    model = build_model(ModelConfig(arch="resnet18", pretrained="none", head="seed", freeze_backbone=True))
    model.train()
    assert not model.net.bn1.training and not model.net.layer4[0].bn2.training
    assert model.net.fc.training  # dropout in the head still active
    before = model.net.bn1.running_mean.clone()
    model(torch.randn(4, 3, 64, 64))
    assert torch.equal(before, model.net.bn1.running_mean)


@pytest.mark.parametrize("arch, features", [("resnet18", 512), ("resnet50", 2048)])
def test_archs_output_two_logits(arch, features):
    model = build_model(ModelConfig(arch=arch, pretrained="none", head="linear"))
    assert model.net.fc.in_features == features
    assert model(torch.randn(2, 3, 96, 96)).shape == (2, 2)


def test_pretrained_from_a_state_dict_file(tmp_path):
    donor = build_model(ModelConfig(arch="resnet18", pretrained="none"))
    path = tmp_path / "weights.pt"
    torch.save(donor.net.state_dict(), path)
    model = build_model(ModelConfig(arch="resnet18", pretrained=str(path), head="seed"))
    assert torch.equal(model.net.conv1.weight, donor.net.conv1.weight)


def test_pretrained_for_the_wrong_arch_is_a_clear_error(tmp_path):
    path = tmp_path / "r50.pt"
    torch.save(build_model(ModelConfig(arch="resnet50", pretrained="none")).net.state_dict(), path)
    with pytest.raises(UserError, match="does not fit resnet18"):
        build_model(ModelConfig(arch="resnet18", pretrained=str(path)))


@pytest.fixture
def weights_server(tmp_path):
    """A local HTTP server holding a resnet18 weights file named as torchvision names them."""
    state = build_model(ModelConfig(arch="resnet18", pretrained="none")).net.state_dict()
    staging = tmp_path / "staging.pth"
    torch.save(state, staging)
    digest = hashlib.sha256(staging.read_bytes()).hexdigest()[:8]
    served = tmp_path / "served"
    served.mkdir()
    staging.rename(served / f"resnet18-{digest}.pth")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", f"resnet18-{digest}.pth", state
    server.shutdown()


def test_imagenet_download_goes_through_the_hub_cache(weights_server, tmp_path, monkeypatch):
    base, name, state = weights_server
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    fake = types.SimpleNamespace(url=f"https://download.pytorch.org/models/{name}")
    monkeypatch.setitem(models.ARCHS, "resnet18", (models.ARCHS["resnet18"][0], fake))
    model = build_model(ModelConfig(arch="resnet18", pretrained="imagenet", weights_url=base))
    assert torch.equal(model.net.conv1.weight, state["conv1.weight"])
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / name).is_file()  # cached for next time


def test_imagenet_without_network_says_how_to_prefetch(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    with pytest.raises(UserError, match="fetch-weights --arch resnet18") as err:
        models.imagenet_state_dict("resnet18", mirror="http://127.0.0.1:9")  # nothing listens
    assert "hub/checkpoints/resnet18-" in str(err.value)
