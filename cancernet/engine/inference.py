"""One handle on a checkpoint for inference, and one loader for scoring: what evaluate, predict,
predict-slide, extract and export share.

Predictor.load reads the file on rank 0 only and sends the rest of the ranks the config and the
weights (a node of a shared filesystem may still see the file rank 0 just replaced): the model in
eval mode on the rank's device, the config it was trained with (plus any overrides), its
preprocessing, the temperature and the stored operating points.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset

from cancernet.config import SLIDE, Config, from_dict, merge, parse_overrides
from cancernet.data.augment import Preprocess
from cancernet.data.datasets import ShardSampler
from cancernet.engine import checkpoint
from cancernet.engine.predict import evaluate
from cancernet.models.classifier import build_for_weights
from cancernet.runtime.distributed import DistInfo
from cancernet.runtime.errors import UserError
from cancernet.runtime.signals import loader_workers


def scoring_loader(
    dataset: Dataset, dist: DistInfo, batch_size: int, num_workers: int, batched: bool = False, collate_fn=None
) -> DataLoader:
    """Every item once over the ranks, in contiguous shards that gather back in order
    (engine.predict.evaluate); workers from the fork server. batched: the dataset reads a list of
    indices at a time (one read per batch)."""
    sampler = ShardSampler(len(dataset), dist.rank, dist.world_size)
    common = {"pin_memory": dist.device.type == "cuda", **loader_workers(num_workers)}
    if batched:
        return DataLoader(dataset, batch_size=None, sampler=BatchSampler(sampler, batch_size, False), **common)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, **common)


def preprocessing(cfg: Config, device: torch.device) -> Preprocess:
    """What the model's inputs are made with: resize, normalisation, memory format."""
    return Preprocess.from_config(cfg.data, channels_last=cfg.model.channels_last).to(device)


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Predictor:
    model: nn.Module
    cfg: Config
    ckpt: checkpoint.Checkpoint
    dist: DistInfo
    temperature: float = 1.0
    sha256: str | None = field(default=None, repr=False)  # of the file: a retrained checkpoint differs

    @classmethod
    def load(
        cls,
        path: str | Path,
        dist: DistInfo,
        overrides: list[str] = (),
        calibrated: bool = True,
        ckpt: checkpoint.Checkpoint | None = None,
    ) -> Predictor:
        """A collective under torchrun: every rank calls it. overrides ('section.key=value')
        adjust the checkpoint's config (slide.*, train.progress, ...); ckpt: the file as
        read_on_main read it already (with its sha256)."""
        ckpt = ckpt or checkpoint.read_on_main(path, dist, extra=lambda: {"sha256": sha256_of(path)})
        if ckpt.task == SLIDE:
            raise UserError(
                f"checkpoint {path} is a slide-level (MIL) model, not a patch model: "
                f"`python -m cancernet predict-slide SLIDES --checkpoint {path} --out DIR` scores slides with it"
            )
        cfg = from_dict(merge(ckpt.config_dict, parse_overrides(list(overrides))))
        model = build_for_weights(cfg).to(dist.device)
        checkpoint.load_weights_on_main(ckpt, model, dist)
        return cls(model.eval(), cfg, ckpt, dist, ckpt.temperature(calibrated), ckpt.get("sha256"))

    @cached_property
    def preprocess(self) -> Preprocess:
        return preprocessing(self.cfg, self.dist.device)

    @property
    def preprocessing_source(self) -> str:
        """Where data.mean/std/image_size came from when the model was trained (the weights' own
        preprocessing, or the config), as the checkpoint records it."""
        return (self.ckpt.get(checkpoint.PREPROCESS) or {}).get("source", "the config (not recorded)")

    def predict(self, loader: DataLoader, amp: str = "off", tta: bool = False) -> dict:
        """index, label, log_odds and prob (after the temperature) of every item, on every rank."""
        return evaluate(self.model, loader, self.preprocess, self.dist, amp, tta, self.temperature)

    def threshold(self, tta: bool) -> float:
        """The stored operating point for predictions made this way (plain or TTA, same temperature)."""
        path, point = self.ckpt.path, self.ckpt.operating_point(tta)
        if not point:
            how = "--tta " if tta else ""
            raise UserError(
                f"checkpoint {path} holds no operating point chosen on {'TTA' if tta else 'plain'} "
                f"predictions; run `python -m cancernet evaluate RUN {how}[--target-sensitivity S]` "
                "first, or pass --threshold"
            )
        if point.get("tta", False) != tta:
            raise UserError(
                f"checkpoint {path}: its operating point was chosen on {'TTA' if point.get('tta') else 'plain'} "
                f"predictions; these are {'TTA' if tta else 'plain'}: re-run evaluate with the same --tta"
            )
        if abs(float(point.get("temperature", 1.0)) - self.temperature) > 1e-9:
            raise UserError(
                f"checkpoint {path}: its operating point was chosen on probabilities at temperature "
                f"{point.get('temperature', 1.0):.4g}, these use {self.temperature:.4g}: drop --no-calibration "
                "or pass --threshold"
            )
        return float(point["threshold"])
