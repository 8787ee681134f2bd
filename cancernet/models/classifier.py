"""Any torchvision classifier as a patch classifier: head replacement, freezing, pretrained weights."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from cancernet.models.archs import check_arch, family_of
from cancernet.models.config import ModelConfig
from cancernet.runtime.errors import UserError

log = logging.getLogger(__name__)
# builder arguments that keep a model's forward a plain (N, classes) tensor
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_BUILD_KWARGS = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


def head_name(net: nn.Module, arch: str) -> str:
    """The dotted name of the final classifier layer (fc, classifier.1, heads.head, ...)."""
    linears = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(
            f"model.arch={arch}: no final Linear layer to replace with the head "
            "(its classifier is a convolution); choose another architecture"
        )
    return linears[-1]


class PatchClassifier(nn.Module):
    """A torchvision classifier whose final layer is the chosen head; a frozen backbone stays in eval mode."""

    def __init__(self, net: nn.Module, head: str, freeze_backbone: bool):
        super().__init__()
        self.net, self.head_name, self.freeze_backbone = net, head, freeze_backbone
        if freeze_backbone:
            for name, p in net.named_parameters():
                p.requires_grad_(name.startswith(f"{head}."))

    @property
    def head(self) -> nn.Module:
        return self.net.get_submodule(self.head_name)

    def train(self, mode: bool = True) -> PatchClassifier:
        super().train(mode)
        if self.freeze_backbone:  # frozen BatchNorm must keep its ImageNet running statistics
            self.net.eval()
            self.head.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def stages(self) -> list[tuple[str, nn.Module]]:
        """The backbone's stages in forward order (resnet: conv1, bn1, layer1..4; densenet:
        features.conv0 ... features.norm5): the units of layer-wise LR decay and Grad-CAM."""
        head = self.head

        def holds_head(m: nn.Module) -> bool:
            return any(sub is head for sub in m.modules())

        def with_params(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
            return [
                (f"{prefix}{n}", m)
                for n, m in module.named_children()
                if not holds_head(m) and any(True for _ in m.parameters())
            ]

        stages = with_params(self.net, "")
        while len(stages) < 4:  # too coarse (one container, or ViT's encoder): open the largest stage
            size = {name: sum(p.numel() for p in m.parameters()) for name, m in stages}
            openable = [(size[name], i) for i, (name, m) in enumerate(stages) if with_params(m, "")]
            if not openable:
                break
            i = max(openable)[1]
            stages[i : i + 1] = with_params(stages[i][1], f"{stages[i][0]}.")
        return stages

    def parameter_stages(self) -> dict[str, int]:
        """Parameter name (of self.net) -> stage index; the head's parameters get len(stages)."""
        stages = self.stages()
        out, current = {}, 0
        for name, _ in self.net.named_parameters():
            if name.startswith(f"{self.head_name}."):
                out[name] = len(stages)
                continue
            for i, (prefix, _) in enumerate(stages):
                if name.startswith(f"{prefix}."):
                    current = i
                    break
            out[name] = current  # a parameter outside every stage joins the one before it
        return out


def make_head(kind: str, features: int) -> nn.Module:
    if kind == "seed":  # the original recipe's head
        return nn.Sequential(
            nn.Dropout(0.5), nn.Linear(features, 128), nn.ReLU(inplace=True), nn.Dropout(0.3), nn.Linear(128, 2)
        )
    return nn.Linear(features, 2)


def imagenet_weights(arch: str):
    """torchvision's DEFAULT ImageNet weights enum entry for arch."""
    return tvm.get_model_weights(arch).DEFAULT


def imagenet_state_dict(arch: str, mirror: str | None = None) -> dict[str, torch.Tensor]:
    """ImageNet weights through torchvision's weights enums and the torch.hub cache ($TORCH_HOME).

    mirror: a base URL (http://, https://, file://) holding the same file names, for clusters
    that mirror the weights internally.
    """
    check_arch(arch)
    url = imagenet_weights(arch).url
    url = url if mirror is None else f"{mirror.rstrip('/')}/{url.rsplit('/', 1)[1]}"
    try:
        return torch.hub.load_state_dict_from_url(
            url, progress=False, check_hash=True, map_location="cpu", weights_only=True
        )
    except Exception as e:  # URLError, timeouts, hash mismatch: all mean "not available here"
        cache = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
        raise UserError(
            f"cannot get ImageNet weights for {arch} from {url} ({e}). On a machine with network run "
            f"`python -m cancernet fetch-weights --arch {arch}` and copy {cache.name} to {cache} "
            f"here (or set TORCH_HOME to a shared folder that holds hub/checkpoints/{cache.name}); "
            "or set model.pretrained to a state-dict path, or model.pretrained=none"
        ) from None


OWN_WEIGHTS = ("imagenet", "hub")  # model.pretrained: the architecture's own pretrained weights


def _load_backbone_weights(net: nn.Module, cfg: ModelConfig, head: str, image_size: int) -> None:
    if cfg.pretrained == "none":
        return
    if cfg.pretrained in OWN_WEIGHTS:
        state = imagenet_state_dict(cfg.arch, cfg.weights_url)
    else:
        path = Path(os.path.expanduser(cfg.pretrained))
        if not path.is_file():
            raise UserError(f"model.pretrained: {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state)  # a cancernet checkpoint or a bare state dict
        state = {k.removeprefix("net."): v for k, v in state.items()}
    own = net.state_dict()
    modules = {name.split(".")[0] for name in own}
    state = {k: v for k, v in state.items() if not k.startswith(f"{head}.")}  # the head is ours
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and not k.startswith(f"{head}.")]
    unexpected = [k for k in state if k not in own and k.split(".")[0] in modules]  # aux heads: ignored
    if mismatched or missing or unexpected:
        hint = ""
        if "pos_embedding" in " ".join(mismatched):
            hint = f" (these weights were trained at another image size; data.image_size={image_size} differs)"
        raise UserError(
            f"model.pretrained={cfg.pretrained} does not fit {cfg.arch}{hint}: "
            f"mismatched {mismatched[:2]}, missing {missing[:2]}, unexpected {unexpected[:2]}"
        )
    net.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def _build_net(arch: str, image_size: int) -> nn.Module:
    kwargs = dict(_BUILD_KWARGS.get(arch, {}))
    model_class = inspect.signature(tvm.get_model_builder(arch)).return_annotation
    params = inspect.signature(model_class).parameters if inspect.isclass(model_class) else {}
    if "image_size" in params:  # ViT: positional embeddings sized for the input
        kwargs["image_size"] = image_size
    elif "input_size" in params:  # MaxViT
        kwargs["input_size"] = (image_size, image_size)
    return tvm.get_model(arch, weights=None, **kwargs)


def _build_timm_net(cfg: ModelConfig, image_size: int) -> nn.Sequential:
    """backbone (a timm model without its classifier) -> head, the head named "head"."""
    from cancernet.models import timm as timm_models

    backbone = timm_models.create(cfg.arch, cfg.pretrained in OWN_WEIGHTS, image_size)
    if cfg.pretrained not in (*OWN_WEIGHTS, "none"):
        path = Path(os.path.expanduser(cfg.pretrained))
        if not path.is_file():
            raise UserError(f"model.pretrained: {path} does not exist")
        timm_models.load_file(backbone, path, cfg.arch)
    return nn.Sequential(OrderedDict(backbone=backbone, head=make_head(cfg.head, backbone.num_features)))


def _build_torchvision(cfg: ModelConfig, image_size: int) -> tuple[nn.Module, str]:
    try:
        net = _build_net(cfg.arch, image_size)
    except (ValueError, AssertionError, RuntimeError) as e:
        raise UserError(f"model.arch={cfg.arch} cannot be built for data.image_size={image_size}: {e}") from None
    head = head_name(net, cfg.arch)
    _load_backbone_weights(net, cfg, head, image_size)
    net.set_submodule(head, make_head(cfg.head, net.get_submodule(head).in_features))
    return net, head


def _torchvision_preprocessing(cfg: ModelConfig) -> dict:
    weights = imagenet_weights(cfg.arch)
    transform = weights.transforms()
    return {
        "mean": list(transform.mean),
        "std": list(transform.std),
        "image_size": int(transform.crop_size[0]),
        "source": f"torchvision's {weights}",
    }


def _timm_preprocessing(cfg: ModelConfig) -> dict:
    from cancernet.models import timm as timm_models

    found = timm_models.pretrained_cfg(cfg.arch)
    return {
        "mean": [float(v) for v in found.get("mean", IMAGENET_MEAN)],
        "std": [float(v) for v in found.get("std", IMAGENET_STD)],
        "image_size": int(found.get("input_size", (3, 224, 224))[-1]),
        "source": f"timm's pretrained config of {cfg.arch}",
    }


def _torchvision_fetch(arch: str, mirror: str | None) -> str:
    imagenet_state_dict(arch, mirror)
    return f"ImageNet weights for {arch} are in the torch hub cache (TORCH_HOME)"


def _timm_fetch(arch: str, mirror: str | None) -> str:
    from cancernet.models import timm as timm_models

    folder = timm_models.fetch(arch)
    repo = folder.parents[1]  # .../hub/models--ORG--NAME/snapshots/<revision>
    return (
        f"{arch} is in the Hugging Face cache: {folder}. On a cluster without internet copy {repo} to the "
        "same place under its HF_HOME (or share HF_HOME), and run with HF_HUB_OFFLINE=1"
    )


# Each model family's construction (net and the name of its head module), the preprocessing its
# pretrained weights expect, and the download of those weights; models/archs.py's FAMILIES
# recognises and checks the names.
FAMILY_BUILD = {"torchvision": _build_torchvision, "timm": lambda cfg, size: (_build_timm_net(cfg, size), "head")}
FAMILY_PREPROCESSING = {"torchvision": _torchvision_preprocessing, "timm": _timm_preprocessing}
FAMILY_FETCH = {"torchvision": _torchvision_fetch, "timm": _timm_fetch}


def build_model(cfg: ModelConfig, image_size: int) -> PatchClassifier:
    """The classifier for model.arch at data.image_size, with its head and pretrained weights."""
    check_arch(cfg.arch)
    net, head = FAMILY_BUILD[family_of(cfg.arch).name](cfg, image_size)
    model = PatchClassifier(net, head, cfg.freeze_backbone)
    _probe(model, cfg.arch, image_size)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def weights_preprocessing(cfg: ModelConfig) -> dict:
    """The mean, std and input size the architecture's pretrained weights were trained with:
    timm's pretrained config (the Hub's config.json for hf-hub models), or torchvision's weights'."""
    return FAMILY_PREPROCESSING[family_of(cfg.arch).name](cfg)


def fetch_weights(arch: str, mirror: str | None = None) -> str:
    """Download arch's pretrained weights into their cache (a machine with network, e.g. a
    cluster's login node); returns where they are and how to use them offline."""
    check_arch(arch, "--arch")
    return FAMILY_FETCH[family_of(arch).name](arch, mirror)


def resolve_preprocessing(cfg):
    """(cfg with data.mean/std/image_size that are null set to what the weights expect, a
    description of where each value came from). cfg: a cancernet.config.Config."""
    data = cfg.data
    unset = [k for k in ("mean", "std", "image_size") if getattr(data, k) is None]
    if not unset:
        return cfg, "set in the config"
    found = weights_preprocessing(cfg.model)
    data = dataclasses.replace(data, **{k: found[k] for k in unset})
    why = f"data.{'/'.join(unset)} from {found['source']}"
    log.info("preprocessing: mean %s, std %s, %d px (%s)", data.mean, data.std, data.image_size, why)
    return dataclasses.replace(cfg, data=data), why


def embed(model: nn.Module, inputs: torch.Tensor, with_logits: bool = False):
    """What the head of a PatchClassifier receives: the backbone's features (N, D); with_logits:
    (features, the model's logits (N, 2)) from the same forward."""
    seen = {}
    handle = model.head.register_forward_pre_hook(lambda module, args: seen.__setitem__("x", args[0]))
    try:
        logits = model(inputs)
    finally:
        handle.remove()
    return (seen["x"].flatten(1), logits) if with_logits else seen["x"].flatten(1)


def build_for_weights(cfg) -> PatchClassifier:
    """The model of a config (a cancernet.config.Config) whose weights a checkpoint will bring:
    nothing pretrained is fetched or read."""
    return build_model(dataclasses.replace(cfg.model, pretrained="none"), cfg.data.image_size)


def tumour_log_odds(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(N,) log-odds of class 1 from (N, 2) logits: (logit_1 - logit_0) / temperature. P(tumour)
    is its sigmoid; training, evaluation, predict and export all score with this."""
    return (logits[:, 1] - logits[:, 0]) / temperature


def _probe(model: nn.Module, arch: str, image_size: int) -> None:
    """Fail now, naming the size, if the architecture cannot take image_size patches."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 3, image_size, image_size))
    except (RuntimeError, ValueError, AssertionError, IndexError) as e:
        raise UserError(
            f"model.arch={arch} cannot take data.image_size={image_size} inputs "
            f"({str(e).splitlines()[0]}); use a larger data.image_size"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.shape != (1, 2):
        raise UserError(f"model.arch={arch} does not return (N, 2) logits with the replaced head; choose another")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
