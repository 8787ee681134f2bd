"""Slide-level models over a bag of tile features (multiple-instance learning).

Every model takes a bag X (B, N, D) of N tiles' features and gives one logit per bag (B,) and an
attention per tile (B, N) (what it weighed each tile by: attention scores, or the tile's own
score for max pooling); `loss(X, y)` is what training minimises (the bag's BCE, plus the
instance terms CLAM and DSMIL add). ABMIL (gated attention), CLAM-SB, TransMIL and DSMIL are
torchmil's (Apache-2.0); the mean and max pooling baselines are here.
"""

from __future__ import annotations

import torch
from torch import nn

MIL_ARCHS = ("abmil", "clam_sb", "transmil", "dsmil", "mean", "max")


class Pooling(nn.Module):
    """Baselines: mean pooling (one linear layer on the bag's mean feature) or max pooling (a
    linear score per tile, the bag's logit its highest)."""

    def __init__(self, dim: int, how: str):
        super().__init__()
        self.how, self.score = how, nn.Linear(dim, 1)

    def forward(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: N803 (torchmil's name)
        if self.how == "mean":
            logit = self.score(X.mean(1)).squeeze(-1)
            return logit, torch.full(X.shape[:2], 1.0 / X.shape[1], device=X.device)
        scores = self.score(X).squeeze(-1)
        return scores.max(1).values, scores

    def loss(self, X: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: N803
        logit, _ = self(X)
        return logit, nn.functional.binary_cross_entropy_with_logits(logit.float(), y.float())


class TorchMil(nn.Module):
    """A torchmil model behind the same two calls; weights: of its loss terms (default 1)."""

    def __init__(self, net: nn.Module, weights: dict[str, float] | None = None):
        super().__init__()
        self.net, self.weights = net, weights or {}

    def forward(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: N803
        logit, attention = self.net(X, return_att=True)[:2]
        return logit, attention.reshape(X.shape[:2])

    def loss(self, X: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: N803
        logit, terms = self.net.compute_loss(y.float(), X)
        return logit, sum(self.weights.get(name, 1.0) * value for name, value in terms.items())


def build_mil(arch: str, dim: int) -> nn.Module:
    """model.mil's model for features of size dim."""
    if arch in ("mean", "max"):
        return Pooling(dim, arch)
    from torchmil import models

    nets = {
        "abmil": lambda: models.ABMIL(in_shape=(dim,), gated=True),
        "clam_sb": lambda: models.CLAM_SB(in_shape=(dim,), gated=True),
        "transmil": lambda: models.TransMIL(in_shape=(dim,)),
        "dsmil": lambda: models.DSMIL(in_shape=(dim,)),
    }
    # CLAM's own weighting of its bag and instance (SmoothTop1SVM) losses: 0.7 and 0.3
    weights = {"BCEWithLogitsLoss": 0.7, "InstLoss": 0.3} if arch == "clam_sb" else None
    return TorchMil(nets[arch](), weights)
