"""The `model:` section of the config: the network, its weights and how it is compiled and wrapped."""

from __future__ import annotations

from dataclasses import dataclass

from cancernet.runtime.schema import choice

# slide-level models over a bag of tile features (models/mil.py builds each)
MIL_ARCHS = ("abmil", "clam_sb", "transmil", "dsmil", "mean", "max")


@dataclass
class ModelConfig:
    arch: str = "resnet34"  # any torchvision classifier
    pretrained: str = "imagenet"  # imagenet | none | path to a state dict
    weights_url: str | None = None  # mirror folder for the ImageNet weight files
    freeze_backbone: bool = False  # train the head only (with train.feature_cache: features computed once)
    head: str = choice("linear", "seed", "linear")  # linear, or the notebook's small MLP head (seed)
    channels_last: bool = True  # NHWC memory layout (faster convolutions on GPUs)
    compile: bool = False  # torch.compile the model
    compile_scope: str = choice("model", "model", "ddp")  # compile the bare model inside DDP, or DDP itself
    sync_bn: bool = False  # SyncBatchNorm across ranks (CUDA)
    mil: str = choice("none", "none", *MIL_ARCHS)  # a slide-level model: the run trains on slides, not patches
