"""Running a model over batches: autocast on any device, P(tumour) with optional TTA, and the
sharded prediction of a whole loader gathered on every rank. Training, evaluation, inference,
the feature cache and slides all predict through here."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cancernet.data.augment import dihedral_views
from cancernet.data.datasets import to_device
from cancernet.models.classifier import tumour_log_odds
from cancernet.runtime.distributed import DistInfo, gather_rows


def autocast(device: torch.device, amp: str):
    """train.amp on any device, the CPU included (bf16: no scaler; fp16: with a GradScaler)."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def predict_scores(
    model: nn.Module, inputs: torch.Tensor, amp: str = "off", tta: bool = False, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P(tumour), its log-odds), each (N,). The log-odds of one view is (logit_1 - logit_0) / T;
    with tta, P is averaged over the 8 dihedral views (each tempered first)."""
    views = dihedral_views(inputs) if tta else [inputs]
    with autocast(inputs.device, amp):
        log_odds = [tumour_log_odds(model(v).float(), temperature) for v in views]
    if len(log_odds) == 1:
        return log_odds[0].sigmoid(), log_odds[0]
    prob = torch.stack([lo.double().sigmoid() for lo in log_odds]).mean(0)
    return prob.float(), torch.logit(prob, eps=1e-12).float()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    preprocess: nn.Module,
    dist: DistInfo,
    amp: str = "off",
    tta: bool = False,
    temperature: float = 1.0,
    progress=None,
) -> dict[str, np.ndarray]:
    """Predict every sample of a sharded loader; every rank gets all rows, sorted by index.

    Pass the unwrapped model: DDP's forward would start collectives that uneven shards break.
    Returns index, label, prob, loss (per-sample NLL) and log_odds (of prob).
    """
    model.eval()
    rows = []
    for batch in loader:
        images, labels, index = to_device(batch, dist.device)
        prob, log_odds = predict_scores(model, preprocess(images), amp, tta, temperature)
        loss = F.binary_cross_entropy_with_logits(log_odds.double(), labels.clamp(min=0).double(), reduction="none")
        rows.append(torch.stack([index.double(), labels.double(), prob.double(), loss, log_odds.double()], 1))
        if progress is not None:
            progress.update(1)
    local = torch.cat(rows) if rows else torch.zeros(0, 5, dtype=torch.float64, device=dist.device)
    table = gather_rows(local, dist).cpu().numpy()
    table = table[np.argsort(table[:, 0], kind="stable")]
    return {
        "index": table[:, 0].astype(np.int64),
        "label": table[:, 1].astype(np.int64),
        "prob": table[:, 2],
        "loss": table[:, 3],
        "log_odds": table[:, 4],
    }
