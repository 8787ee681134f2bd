"""The slide task: a slide-level (MIL) model over bags of tile features (configs/mil.yaml).

Bags are slides: extract-features' <slide>.h5 under data.features, labels from data.slides_csv
(slide,label[,patient]; a patient's slides stay in one split, k-fold with data.folds/fold). One
bag per rank per optimizer step (train.grad_accum steps accumulate), each step's bags of similar
size over the ranks (data/bags.BalancedBags); training bags sample at most data.max_instances
tiles. Everything else (loop, checkpoints, resume, budget, EMA, W&B) is the one training run's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from cancernet.config import SLIDE, Config
from cancernet.data.bags import Bags, BalancedBags, bag_loader, slide_table
from cancernet.data.splits import make_splits, reuse_splits, split_seed
from cancernet.data.tile_features import TileSettings
from cancernet.engine import checkpoint
from cancernet.engine.loaders import check_validation_split
from cancernet.engine.rundir import RunDir
from cancernet.evaluate.slide_report import score_bags, scoring_loader, test_report
from cancernet.models.mil import build_mil
from cancernet.runtime.atomic import write_text
from cancernet.runtime.distributed import DistInfo, on_main
from cancernet.train.budget import forward_seconds

log = logging.getLogger(__name__)


class BagLoss(nn.Module):
    """A slide-level model's training loss (its instance terms included) and whether the bag's
    logit has the label's sign."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, bags: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logit, loss = self.model.loss(bags, labels)
        return loss, ((logit.detach().float() > 0).long() == labels).sum()


@dataclass
class SlideTask:
    cfg: Config
    dist: DistInfo
    table: pd.DataFrame
    model: nn.Module
    sampler: BalancedBags
    train_loader: DataLoader  # training bags; its workers live for the run
    scoring: dict[str, DataLoader]  # validation and test bags, every one once over the ranks
    settings: TileSettings  # how the bags' features were made: best.pt records it for predict-slide
    feature_dim: int

    kind = SLIDE
    sample_name = "bags"

    @staticmethod
    def prepare(cfg: Config) -> tuple[Config, dict]:
        return cfg, {}

    @classmethod
    def build(cls, cfg: Config, dist: DistInfo, run: RunDir, meta: dict, resuming: bool) -> SlideTask:
        """The slides and their splits (splits.csv), bags and loaders, the model on the device."""
        d, seed = cfg.data, cfg.train.seed
        table, settings, dim = on_main(lambda: _split_table(cfg, run, resuming), dist)  # rank 0 reads the files
        if dist.is_main:
            columns = ["id", "split", *(["fold"] if "fold" in table else [])]
            write_text(run.splits, table[columns].to_csv(index=False))
        log.info("slides: %s", {str(k): int(v) for k, v in table["split"].value_counts().items()})
        check_validation_split(table, "slide", "the slides in data.slides_csv")
        part = {s: table[table["split"] == s].reset_index(drop=True) for s in ("train", "val", "test")}
        bags = {
            s: Bags(d.features, p["id"], p["label"].to_numpy(), d.max_instances if s == "train" else None, seed)
            for s, p in part.items()
        }
        model = build_mil(cfg.model.mil, dim).to(dist.device)
        log.info(
            "model %s over %d features: %d parameters", cfg.model.mil, dim, sum(p.numel() for p in model.parameters())
        )
        sampler = BalancedBags(part["train"]["tiles"].to_numpy(), dist.rank, dist.world_size, seed)
        pinned = dist.device.type == "cuda"  # bags from pinned memory: copies that do not block the host
        return cls(
            cfg,
            dist,
            table,
            model,
            sampler,
            bag_loader(bags["train"], sampler, d.num_workers, pinned),
            {s: scoring_loader(bags[s], dist, d.num_workers) for s in ("val", "test")},
            settings,
            dim,
        )

    @property
    def trained(self) -> nn.Module:
        return self.model

    def loss_module(self, trained: nn.Module) -> nn.Module:
        return BagLoss(trained)

    def inputs(self, batch, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        feats, label, _ = batch
        device = self.dist.device
        return feats[None].to(device, non_blocking=True).float(), label.reshape(1).to(device, non_blocking=True)

    def validate(self, eval_model: nn.Module) -> pd.DataFrame:
        return score_bags(eval_model, self.scoring["val"], self.dist, self.cfg.train.amp)

    def validation_seconds(self, eval_model: nn.Module) -> float:
        val = self.table[self.table["split"] == "val"]
        example = torch.zeros(1, max(1, int(val["tiles"].mean())), self.feature_dim, device=self.dist.device)
        seconds = forward_seconds(eval_model, example, self.dist.device, self.cfg.train.amp)
        return len(val) / self.dist.world_size * seconds

    def facts(self) -> dict:
        return {
            checkpoint.TASK: SLIDE,
            checkpoint.FEATURES: self.settings.to_dict(),
            checkpoint.FEATURE_DIM: self.feature_dim,
        }

    def test(self, training, tracker, extra_facts: dict) -> dict | None:
        run, table = training.run, self.table
        return test_report(self.cfg, self.dist, run, self.scoring, self.model, table, tracker, extra_facts)


def _split_table(cfg: Config, run: RunDir, resuming: bool) -> tuple[pd.DataFrame, TileSettings, int]:
    """Every slide of data.slides_csv with its split (splits.csv's when resuming), the features'
    settings and dimension."""
    from cancernet.data.tile_features import TileFeatures, path_of

    d = cfg.data
    table, settings = slide_table(d)
    dim = TileFeatures(path_of(d.features, table["id"].iloc[0])).shape[1]
    saved = run.read_splits() if resuming else None
    if saved is not None:
        return reuse_splits(saved, table), settings, dim
    grouped = table["group"].nunique() < len(table)
    groups = pd.Series(table["group"].to_numpy(), index=table["id"]) if grouped else None
    return make_splits(table, d.val_fraction, d.test_fraction, split_seed(cfg), groups, d.folds, d.fold), settings, dim
