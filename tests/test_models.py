import hashlib
import http.server
import threading
import types
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch

from cancernet.config import ModelConfig, OptimConfig, load_config
from cancernet.models import classifier as models
from cancernet.models.classifier import build_model, count_parameters
from cancernet.runtime.errors import ConfigError, UserError
from cancernet.train.optim import build_optimizer, param_groups

from conftest import CONFIGS


def test_seed_head_on_frozen_resnet34_trains_65922_parameters():
    """The original recipe's number: only the head (512->128->2) learns."""
    model = build_model(ModelConfig(arch="resnet34", pretrained="none", head="seed", freeze_backbone=True), 96)
    trainable, total = count_parameters(model)
    assert trainable == 65_922 and total > 21_000_000
    head = model.net.fc
    assert [type(m).__name__ for m in head] == ["Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert (head[0].p, head[3].p, head[1].out_features, head[4].out_features) == (0.5, 0.3, 128, 2)


def test_frozen_backbone_batchnorm_stays_in_eval_mode():
    model = build_model(ModelConfig(arch="resnet18", pretrained="none", head="seed", freeze_backbone=True), 64)
    model.train()
    assert not model.net.bn1.training and not model.net.layer4[0].bn2.training
    assert model.net.fc.training  # dropout in the head still active
    before = model.net.bn1.running_mean.clone()
    model(torch.randn(4, 3, 64, 64))
    assert torch.equal(before, model.net.bn1.running_mean)


def test_unknown_arch_names_the_key_and_suggests_close_names():
    with pytest.raises(ConfigError, match="'model.arch'.*'resnet19'.*did you mean.*resnet18"):
        load_config(CONFIGS / "cpu_test.yaml", ["model.arch=resnet19"])
    with pytest.raises(ConfigError, match="densenet121"):
        load_config(CONFIGS / "cpu_test.yaml", ["model.arch=densnet121"])
    assert load_config(CONFIGS / "cpu_test.yaml", ["model.arch=regnet_y_400mf"]).model.arch == "regnet_y_400mf"


FAMILIES = ["resnet18", "densenet121", "efficientnet_b0", "convnext_tiny", "mobilenet_v3_small"]
TIMM_FAMILIES = ["timm:resnet10t", "timm:vit_tiny_patch16_224"]  # a timm CNN and a ViT (no Grad-CAM)


@pytest.mark.parametrize(
    "arch, head",
    [
        ("resnet18", "fc"),
        ("densenet121", "classifier"),
        ("efficientnet_b0", "classifier.1"),
        ("convnext_tiny", "classifier.2"),
        ("mobilenet_v3_small", "classifier.3"),
        ("vit_b_16", "heads.head"),
    ],
)
def test_the_final_classifier_layer_of_each_family_becomes_the_head(arch, head):
    model = build_model(
        ModelConfig(arch=arch, pretrained="none", head="seed", freeze_backbone=True, channels_last=False),
        64 if arch != "vit_b_16" else 32,
    )
    assert model.head_name == head and model.head[-1].out_features == 2
    trainable = {name for name, p in model.net.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(f"{head}.") for name in trainable)  # freezing leaves only the head
    model.train()
    frozen_bn = [m for name, m in model.net.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert all(not m.training for m in frozen_bn)


def test_parameter_groups_get_the_learning_rates_asked_for():
    model = build_model(ModelConfig(arch="resnet18", pretrained="none", channels_last=False), 32)
    groups = param_groups(model, OptimConfig(lr=1.0, head_lr_mult=10.0, layer_decay=0.5, weight_decay=0.05))
    by_name = {g["name"]: g for g in groups}
    assert by_name["head/decay"]["lr_scale"] == 10.0
    assert by_name["stage5/decay"]["lr_scale"] == 0.5  # layer4: the last of 6 stages
    assert by_name["stage0/decay"]["lr_scale"] == 0.5**6  # conv1
    assert by_name["stage1/no_decay"]["weight_decay"] == 0.0  # bn1: no decay on norm weights/biases
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    decayed = param_groups(model, OptimConfig(decay_norm_bias=True))
    assert all(g["name"].endswith("/decay") for g in decayed)
    # equal hyperparameters share a group (one fused kernel each): decayed and not, whatever the stages
    plain = param_groups(model, OptimConfig(weight_decay=0.05))
    assert [g["weight_decay"] for g in plain] == [0.05, 0.0] and all(g["lr_scale"] == 1.0 for g in plain)
    assert sum(len(g["param_names"]) for g in plain) == len(list(model.parameters()))


def _stepped(groups: list[dict]) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    for g in optimizer.param_groups:
        for p in g["params"]:
            p.grad = torch.randn_like(p)
    optimizer.step()
    return optimizer


@pytest.mark.parametrize("saved_as", ["merged groups", "one group per stage (older checkpoints)"])
def test_a_resume_that_regroups_the_parameters_keeps_each_ones_moments(saved_as):
    from cancernet.train.optim import OptimizerState, legacy_order

    model = build_model(ModelConfig(arch="resnet18", pretrained="none", channels_last=False), 32)
    names = dict(model.net.named_parameters())
    if saved_as == "merged groups":  # saved without layer decay, resumed with it: 2 groups become 14
        saved, resumed = OptimConfig(), OptimConfig(layer_decay=0.7)
        before = _stepped(param_groups(model, saved))
    else:  # as written before groups were merged: per (stage, decay), no parameter names
        resumed = OptimConfig()
        order = legacy_order(model, resumed)
        stage_groups = [g for g in param_groups(model, OptimConfig(layer_decay=0.5)) if g["params"]]
        stage_groups.sort(key=lambda g: order.index(g["param_names"][0]))
        before = _stepped([{"params": g["params"], "lr_scale": 1.0} for g in stage_groups])
    moments = {n: before.state[p]["exp_avg"].clone() for n, p in names.items()}
    state = before.state_dict()
    after = torch.optim.AdamW(param_groups(model, resumed), lr=1e-3)
    OptimizerState(after, legacy_order(model, resumed)).load_state_dict(state)
    for name, p in names.items():
        assert torch.equal(after.state[p]["exp_avg"], moments[name]), name
    assert {g["lr_scale"] for g in after.param_groups} == {g["lr_scale"] for g in param_groups(model, resumed)}


@pytest.mark.slow
@pytest.mark.parametrize("arch", [*FAMILIES, *TIMM_FAMILIES])
def test_each_family_trains_resumes_predicts_and_exports(arch, synth_root, tmp_path):
    from cancernet.engine.inference import Predictor
    from cancernet.evaluate.patch_predict import Exported, export, predict_folder
    from cancernet.runtime.distributed import DistInfo

    from conftest import train

    out = tmp_path / "run"
    common = (
        f"model.arch={arch}",
        "data.limit=96",
        "data.image_size=32",
        "train.batch_size=16",
        "optim.layer_decay=0.8",
        "optim.head_lr_mult=5",
    )
    train(synth_root, out, *common, "train.epochs=1")
    train(synth_root, out, *common, "train.epochs=2")  # resumes: same groups, moments carried over
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and len(last["run_state"]["history"]) == 2
    optim = OptimConfig(layer_decay=0.8, head_lr_mult=5)
    assert len(last["optimizer"]["param_groups"]) == len(
        param_groups(build_model(ModelConfig(arch=arch, pretrained="none"), 32), optim)
    )
    ckpt = out / "checkpoints" / "best.pt"
    info = export(ckpt, tmp_path / "export")
    predictor = Predictor.load(ckpt, DistInfo())
    model, cfg = predictor.model, predictor.cfg
    ids = pd.read_csv(synth_root / "train_labels.csv", dtype={"id": str})["id"][:6]
    paths = [synth_root / "train" / f"{i}.tif" for i in ids]
    assert predictor.temperature == info["temperature"]
    expected = predict_folder(predictor, paths, 6, 0)
    batch = torch.from_numpy(np.stack([models_read(p) for p in paths]))
    program = torch.export.load(str(tmp_path / "export" / "model.pt2")).module()
    with torch.no_grad():
        assert np.allclose(program(batch).numpy(), expected, atol=1e-5)
        assert np.allclose(Exported(model, cfg, info["temperature"])(batch).numpy(), expected, atol=1e-5)


def models_read(path):
    from cancernet.data.patch import read_patch

    return read_patch(path)


def test_fixed_size_models_get_the_image_size_or_a_clear_error(tmp_path):
    vit = build_model(ModelConfig(arch="vit_b_16", pretrained="none", channels_last=False), 32)
    assert vit(torch.randn(1, 3, 32, 32)).shape == (1, 2)  # positional embeddings sized for 32 px
    torch.save(build_model(ModelConfig(arch="vit_b_16", pretrained="none"), 48).net.state_dict(), tmp_path / "v.pt")
    with pytest.raises(UserError, match="another image size.*data.image_size=32"):
        build_model(ModelConfig(arch="vit_b_16", pretrained=str(tmp_path / "v.pt")), 32)
    with pytest.raises(UserError, match="maxvit_t cannot .*data.image_size=96"):
        build_model(ModelConfig(arch="maxvit_t", pretrained="none"), 96)
    with pytest.raises(UserError, match="squeezenet1_0.*no final Linear"):
        build_model(ModelConfig(arch="squeezenet1_0", pretrained="none"), 96)


def test_gradcam_finds_the_last_convolutional_stage_or_says_it_cannot():
    from cancernet.evaluate.gradcam import GradCamUnavailable, gradcam

    for arch in ("resnet18", "densenet121", "convnext_tiny"):
        model = build_model(ModelConfig(arch=arch, pretrained="none", channels_last=False), 64)
        cams = gradcam(model, torch.randn(2, 3, 64, 64))
        assert cams.shape == (2, 64, 64) and (cams >= 0).all()
    vit = build_model(ModelConfig(arch="vit_b_16", pretrained="none", channels_last=False), 32)
    with pytest.raises(GradCamUnavailable, match="tokens"):
        gradcam(vit, torch.randn(1, 3, 32, 32))


def test_archs_output_two_logits_and_fused_optimizers_build():
    for arch in ("resnet50", "regnet_y_400mf", "shufflenet_v2_x0_5"):
        model = build_model(ModelConfig(arch=arch, pretrained="none", head="linear"), 64)
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 2)
        build_optimizer(OptimConfig(), model, torch.device("cpu"))


def test_pretrained_from_a_state_dict_file(tmp_path):
    donor = build_model(ModelConfig(arch="resnet18", pretrained="none"), 64)
    path = tmp_path / "weights.pt"
    torch.save(donor.net.state_dict(), path)
    model = build_model(ModelConfig(arch="resnet18", pretrained=str(path), head="seed"), 64)
    assert torch.equal(model.net.conv1.weight, donor.net.conv1.weight)


def test_pretrained_for_the_wrong_arch_is_a_clear_error(tmp_path):
    path = tmp_path / "r50.pt"
    torch.save(build_model(ModelConfig(arch="resnet50", pretrained="none"), 64).net.state_dict(), path)
    with pytest.raises(UserError, match="does not fit resnet18"):
        build_model(ModelConfig(arch="resnet18", pretrained=str(path)), 64)


@pytest.fixture
def weights_server(tmp_path):
    """A local HTTP server holding a densenet121 weights file named as torchvision names them."""
    state = build_model(ModelConfig(arch="densenet121", pretrained="none"), 64).net.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    state["classifier.weight"], state["classifier.bias"] = torch.zeros(1000, 1024), torch.zeros(1000)
    staging = tmp_path / "staging.pth"
    torch.save(state, staging)
    digest = hashlib.sha256(staging.read_bytes()).hexdigest()[:8]
    served = tmp_path / "served"
    served.mkdir()
    staging.rename(served / f"densenet121-{digest}.pth")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", f"densenet121-{digest}.pth", state
    server.shutdown()


def test_imagenet_download_goes_through_the_hub_cache(weights_server, tmp_path, monkeypatch):
    base, name, state = weights_server
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(
        models,
        "imagenet_weights",
        lambda arch: types.SimpleNamespace(url=f"https://download.pytorch.org/models/{name}"),
    )
    model = build_model(ModelConfig(arch="densenet121", pretrained="imagenet", weights_url=base), 64)
    assert torch.equal(model.net.features.conv0.weight, state["features.conv0.weight"])
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / name).is_file()  # cached for next time


def test_imagenet_without_network_says_how_to_prefetch(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    with pytest.raises(UserError, match="fetch-weights --arch efficientnet_b0") as err:
        models.imagenet_state_dict("efficientnet_b0", mirror="http://127.0.0.1:9")  # nothing listens
    assert "hub/checkpoints/efficientnet_b0_rwightman-" in str(err.value)  # the DEFAULT weights' file name


def test_scoring_a_bag_of_100k_tiles_builds_no_tile_by_tile_tensor():
    """Evaluation reads every tile of a slide (100,000 and more). No slide-level model may build
    an N x N tensor on the way: TransMIL's own attention output does (about 10 N^2 bytes, out of
    memory on an 80 GB GPU above ~85k tiles), so its class token's row is computed alone."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from cancernet.models.config import MIL_ARCHS
    from cancernet.models.mil import build_mil

    n = 100_000

    class NoSquare(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and sum(size >= n for size in t.shape) >= 2:
                    raise AssertionError(f"{func} made a {tuple(t.shape)} tensor")
            return out

    bag = torch.randn(1, n, 16)
    for arch in MIL_ARCHS:
        torch.manual_seed(0)
        model = build_mil(arch, 16).eval()
        with torch.no_grad(), NoSquare():
            logit, attention = model(bag)
        assert logit.shape == (1,) and attention.shape == (1, n) and torch.isfinite(attention).all(), arch


def test_transmils_attention_is_its_own_class_token_row_over_the_tiles():
    """The O(N) computation gives what torchmil's whole attention matrix gives (its softmax
    recovers the weights; torchmil returns them already normalised)."""
    from cancernet.models.mil import build_mil

    torch.manual_seed(0)
    model = build_mil("transmil", 24).eval()
    for n in (3, 257, 700):
        bag = torch.randn(1, n, 24)
        with torch.no_grad():
            logit, attention = model(bag)
            reference_logit, reference = model.net(bag, return_att=True)
        assert torch.equal(logit, reference_logit)
        assert torch.allclose(attention.exp(), reference.clamp_min(1e-12), atol=1e-7)
