"""The patch task: labelled patches, augmented on the device, through a classifier with
cross-entropy; validation and the test report over patches (engine/predict.py, evaluate/)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from cancernet.config import PATCH, Config
from cancernet.data.datasets import to_device
from cancernet.engine import checkpoint
from cancernet.engine.loaders import SplitLoader, check_validation_split, load_table, make_loader
from cancernet.engine.predict import evaluate
from cancernet.engine.rundir import RunDir
from cancernet.evaluate.patch_eval import evaluate_run
from cancernet.models.classifier import build_model, count_parameters, resolve_preprocessing
from cancernet.runtime.atomic import write_text
from cancernet.runtime.distributed import DistInfo, broadcast_buffers, on_main
from cancernet.runtime.errors import ConfigError
from cancernet.train import features
from cancernet.train.budget import forward_seconds

log = logging.getLogger(__name__)


class ClassifierLoss(nn.Module):
    """Cross-entropy (with optim.label_smoothing) of a classifier's logits, and its correct predictions."""

    def __init__(self, model: nn.Module, label_smoothing: float):
        super().__init__()
        self.model, self.label_smoothing = model, label_smoothing

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(inputs).float()
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return loss, (logits.argmax(1) == labels).sum()


@dataclass
class PatchTask:
    cfg: Config
    dist: DistInfo
    table: pd.DataFrame
    model: nn.Module
    loaders: dict[str, SplitLoader]
    stored: features.HeadOnStoredFeatures | None  # train.feature_cache: the head on stored features
    preprocessing: str  # where data.mean/std/image_size came from

    kind = PATCH
    sample_name = "img"

    @staticmethod
    def prepare(cfg: Config) -> tuple[Config, dict]:
        """The config as this task runs it (data.mean/std/image_size null: the weights' own), and
        what config.yaml's meta records of that."""
        cfg, preprocessing = resolve_preprocessing(cfg)
        return cfg, {"preprocessing": preprocessing}

    @classmethod
    def build(cls, cfg: Config, dist: DistInfo, run: RunDir, meta: dict, resuming: bool) -> PatchTask:
        """The validated, split table (splits.csv, bad_images.csv), the model on the device, the
        feature store when train.feature_cache is on, the loaders of each split."""
        saved_splits = on_main(run.read_splits, dist) if resuming else None  # rank 0 reads, all reuse
        table, bad = load_table(cfg, dist, saved_splits)
        check_validation_split(table)
        log.info("images: %s", {str(k): int(v) for k, v in table["split"].value_counts().items()})
        model = build_model(cfg.model, cfg.data.image_size)
        if cfg.model.sync_bn and dist.is_distributed:
            if dist.device.type != "cuda":
                raise ConfigError("config key 'model.sync_bn': SyncBatchNorm needs CUDA devices; set it false on CPU")
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(dist.device)
        trainable, total = count_parameters(model)
        log.info("model %s: %d trainable of %d parameters", cfg.model.arch, trainable, total)
        stored = features.head_on_stored_features(cfg, dist, model, table)
        store = stored.store if stored else None
        # training and validation read every epoch: their workers stay; the test split's start once
        loaders = {
            s: make_loader(cfg, dist, table[table["split"] == s], s == "train", store, persistent=s != "test")
            for s in ("train", "val", "test")
        }
        if dist.is_main:  # once the model and the data opened: a refused run leaves no files behind
            columns = [c for c in ("id", "split", "fold") if c in table.columns]
            write_text(run.splits, table[columns].to_csv(index=False))
            if bad:
                write_text(run.bad_images, pd.DataFrame(bad.items(), columns=["id", "reason"]).to_csv(index=False))
        return cls(cfg, dist, table, model, loaders, stored, meta["preprocessing"])

    @property
    def sampler(self):
        return self.loaders["train"].sampler

    @property
    def train_loader(self):
        return self.loaders["train"].loader

    @property
    def trained(self) -> nn.Module:
        """With stored features the loop trains the head alone; checkpoints still hold the whole model."""
        return self.scorer(self.model)

    def scorer(self, model: nn.Module) -> nn.Module:
        """What runs on the loaders' inputs: model, or its head on stored features."""
        return self.stored.part(model) if self.stored else model

    def loss_module(self, trained: nn.Module) -> nn.Module:
        return ClassifierLoss(trained, self.cfg.optim.label_smoothing)

    def inputs(self, batch, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        # the index stays on the host: the augmentation draws its parameters there
        (images_u8, labels), index = to_device(batch[:2], self.dist.device), batch[2]
        return self.loaders["train"].augment(images_u8, index, epoch), labels

    def validate(self, eval_model: nn.Module) -> dict:
        broadcast_buffers(eval_model, self.dist)  # one model on every shard: rank 0's BatchNorm statistics
        val = self.loaders["val"]
        return evaluate(self.scorer(eval_model), val.loader, val.preprocess, self.dist, self.cfg.train.amp)

    def validation_seconds(self, eval_model: nn.Module) -> float:
        cfg = self.cfg
        size, batch = cfg.data.image_size, cfg.train.eval_batch_size
        example = torch.zeros(batch, 3, size, size, device=self.dist.device)
        if cfg.model.channels_last:
            example = example.contiguous(memory_format=torch.channels_last)
        seconds = forward_seconds(eval_model, example, self.dist.device, cfg.train.amp)
        return len(self.loaders["val"].ids) / self.dist.world_size / batch * seconds

    def facts(self) -> dict:
        d = self.cfg.data
        preprocess = {"mean": d.mean, "std": d.std, "image_size": d.image_size, "crop": d.crop}
        return {checkpoint.TASK: PATCH, checkpoint.PREPROCESS: {**preprocess, "source": self.preprocessing}}

    def test(self, training, tracker, extra_facts: dict) -> dict | None:
        return evaluate_run(
            self.cfg,
            self.dist,
            training.run,
            self.model,
            self.table,
            self.loaders,
            self.scorer(self.model) if self.stored else None,
            tracker,
            extra_facts,
        )
