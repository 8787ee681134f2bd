"""Slide-level models over a bag of tile features (multiple-instance learning).

Every model takes a bag X (B, N, D) of N tiles' features and gives one logit per bag (B,) and an
attention score per tile (B, N) whose softmax is what it weighed each tile by (attention logits;
the tile's own score for max pooling); `loss(X, y)` is what training minimises (the bag's BCE,
plus the instance terms CLAM and DSMIL add). ABMIL (gated attention), CLAM-SB, TransMIL and DSMIL
are torchmil's (Apache-2.0); the mean and max pooling baselines are here. Evaluation reads every
tile of a slide (100,000 and more), so no model materialises an N x N matrix.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cancernet.models.config import MIL_ARCHS


class Pooling(nn.Module):
    """Baselines: mean pooling (one linear layer on the bag's mean feature) or max pooling (a
    linear score per tile, the bag's logit its highest)."""

    def __init__(self, dim: int, how: str):
        super().__init__()
        self.how, self.score = how, nn.Linear(dim, 1)

    def forward(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: N803 (torchmil's name)
        if self.how == "mean":
            logit = self.score(X.mean(1)).squeeze(-1)
            return logit, torch.zeros(X.shape[:2], device=X.device)  # every tile weighs alike
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
        from torchmil.models import TransMIL

        if isinstance(self.net, TransMIL):
            return transmil_forward(self.net, X)
        logit, attention = self.net(X, return_att=True)[:2]
        return logit, attention.reshape(X.shape[:2])

    def loss(self, X: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: N803
        logit, terms = self.net.compute_loss(y.float(), X)
        return logit, sum(self.weights.get(name, 1.0) * value for name, value in terms.items())


def transmil_forward(net: nn.Module, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: N803
    """TransMIL's logit and its class token's attention over the tiles (last layer, mean over
    heads), in O(N) memory. torchmil's return_att=True builds the layer's whole N x N attention
    (about 10 N^2 bytes: out of memory above ~85k tiles on an 80 GB GPU) to keep one row of it;
    here the layer's input is caught on the way and that row alone is computed from it."""
    attention_module = net.layers[-1].att_module
    caught = []
    hook = attention_module.register_forward_pre_hook(lambda module, args, *_: caught.append(args[0]))
    try:
        logit = net(X)
    finally:
        hook.remove()
    row = nystrom_first_row(attention_module, caught[-1])  # (B, heads, sequence): the class token's
    weights = row.mean(1)[:, 1 : X.shape[1] + 1]  # the real tiles (the padding repeats the first ones)
    return logit, weights.clamp_min(1e-12).log()  # attention logits: their softmax gives the weights back


def nystrom_first_row(attention: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The first row of a torchmil NystromAttention's attention matrix over input x (B, n, dim),
    per head: (B, heads, n). Computed as that module computes the whole matrix, attn1 @ pinv(attn2)
    @ attn3, with attn1 cut to the one row: no tensor larger than landmarks x n per head."""
    from torchmil.nn.attention.nystrom_attention import moore_penrose_iter_pinv

    batch, n, _ = x.shape
    landmarks = attention.n_landmarks
    padding = (-n) % landmarks  # the module pads at the front to a multiple of its landmarks
    x = nn.functional.pad(x, (0, 0, padding, 0), value=0)
    q, k, _ = attention._qkv(x)
    q, k = (t.view(batch, x.shape[1], attention.n_heads, -1).permute(0, 2, 1, 3) for t in (q, k))
    q = q * attention.scale_factor
    per_landmark = math.ceil(n / landmarks)
    q_landmarks = q.reshape(batch, attention.n_heads, landmarks, per_landmark, -1).sum(3) / per_landmark
    k_landmarks = k.reshape(batch, attention.n_heads, landmarks, per_landmark, -1).sum(3) / per_landmark
    first = q[:, :, padding : padding + 1]  # the first real position
    attn1 = (first @ k_landmarks.transpose(-1, -2)).softmax(-1)
    attn2 = (q_landmarks @ k_landmarks.transpose(-1, -2)).softmax(-1)
    attn3 = (q_landmarks @ k.transpose(-1, -2)).softmax(-1)
    row = attn1 @ moore_penrose_iter_pinv(attn2, attention.pinv_iterations) @ attn3
    return row[:, :, 0, padding:]


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
    assert set(nets) | {"mean", "max"} == set(MIL_ARCHS), "every model.mil choice has a builder"
    # CLAM's own weighting of its bag and instance (SmoothTop1SVM) losses: 0.7 and 0.3
    weights = {"BCEWithLogitsLoss": 0.7, "InstLoss": 0.3} if arch == "clam_sb" else None
    return TorchMil(nets[arch](), weights)
