"""Inference from a checkpoint: predict a folder (Kaggle submission), operating point, export."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from cancernet.config import Config
from cancernet.data.augment import Preprocess
from cancernet.data.datasets import FolderDataset
from cancernet.data.kaggle import check_ids
from cancernet.data.patch import PATCH_SHAPE
from cancernet.engine.inference import Predictor, scoring_loader
from cancernet.models.classifier import tumour_log_odds
from cancernet.runtime.atomic import atomic_path, write_text
from cancernet.runtime.distributed import DistInfo
from cancernet.runtime.errors import DataError

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".tif", ".tiff", ".png")
EXPORT_FILES = ("model.ts", "model.pt2", "weights.pt", "model.json")


def list_images(folder: str | Path, ids_csv: str | Path | None) -> tuple[list[str], list[Path]]:
    """ids and paths: every .tif/.png of folder (sorted), or the ids of ids_csv in its order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder of patches")
    found = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    if ids_csv is None:
        if not found:
            raise DataError(f"no .tif or .png images in {folder}")
        return list(found), list(found.values())
    ids_frame = pd.read_csv(ids_csv, dtype={"id": str}, keep_default_na=False)
    if "id" not in ids_frame.columns:
        raise DataError(f"--ids {ids_csv} has no 'id' column")
    check_ids(ids_frame["id"], f"--ids {ids_csv}")
    ids = ids_frame["id"].tolist()
    duplicated = ids_frame["id"][ids_frame["id"].duplicated()]
    if len(duplicated):
        raise DataError(f"--ids {ids_csv} lists id {duplicated.iloc[0]!r} twice")
    missing = [i for i in ids if i not in found]
    if missing:
        raise DataError(
            f"image for id {missing[0]!r} not found in {folder} as .tif or .png ({len(missing)} of {len(ids)} missing)"
        )
    return ids, [found[i] for i in ids]


def predict_folder(
    predictor: Predictor, paths: list[Path], batch_size: int, num_workers: int, tta: bool = False, amp: str = "off"
) -> np.ndarray:
    """P(tumour) of every path, in order; ranks share the work, every rank gets all of it."""
    loader = scoring_loader(FolderDataset(paths, None), predictor.dist, batch_size, num_workers)
    return predictor.predict(loader, amp, tta)["prob"]


def submission(ids: list[str], probs: np.ndarray, threshold: float | None) -> pd.DataFrame:
    """Kaggle's format: id,label with label = P(tumour), or a 0/1 label at a threshold."""
    label = probs if threshold is None else (probs >= threshold).astype(int)
    return pd.DataFrame({"id": ids, "label": label})


class Exported(nn.Module):
    """uint8 NHWC patches (N, 96, 96, 3) in, P(tumour) (N,) out: the validated preprocessing inside."""

    def __init__(self, model: nn.Module, cfg: Config, temperature: float = 1.0):
        super().__init__()
        self.preprocess = Preprocess.from_config(cfg.data, nhwc=True)
        self.model, self.temperature = model, temperature

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return tumour_log_odds(self.model(self.preprocess(images)), self.temperature).sigmoid()


def predict_to_csv(
    checkpoint_path: str | Path,
    images: str | Path,
    out: str | Path,
    dist: DistInfo,
    *,
    ids_csv: str | Path | None = None,
    tta: bool = False,
    calibrated: bool = True,
    threshold: float | None = None,
    threshold_from_checkpoint: bool = False,
    batch_size: int = 256,
    num_workers: int = 0,
    amp: str = "auto",
) -> None:
    """Every patch of a folder through a checkpoint: rank 0 writes id,label (P(tumour), or 0/1 at
    a threshold) atomically; under torchrun the ranks split the images."""
    from cancernet.engine.numerics import resolve_amp

    ids, paths = list_images(images, ids_csv)
    predictor = Predictor.load(checkpoint_path, dist, calibrated=calibrated)
    if threshold_from_checkpoint:
        threshold = predictor.threshold(tta)
    amp, _ = resolve_amp(amp, dist.device)
    start = time.perf_counter()
    probs = predict_folder(predictor, paths, batch_size, num_workers, tta, amp)
    if dist.is_main:
        write_text(out, submission(ids, probs, threshold).to_csv(index=False, float_format="%.8g"))
        seconds = time.perf_counter() - start
        log.info(
            "wrote %d predictions%s to %s in %.1fs (%.0f patches/s; temperature %.3g)",
            len(ids),
            f" (labels at threshold {threshold:.4f})" if threshold is not None else "",
            out,
            seconds,
            len(ids) / seconds,
            predictor.temperature,
        )


def export(ckpt: Path, out_dir: Path, calibrated: bool = True) -> dict:
    """model.ts (TorchScript) and model.pt2 (torch.export), both with preprocessing (and the fitted
    temperature) inside; weights.pt (plain state dict); model.json (what they expect and return)."""
    predictor = Predictor.load(ckpt, DistInfo(), calibrated=calibrated)
    model, cfg, saved, temperature = predictor.model, predictor.cfg, predictor.ckpt, predictor.temperature
    wrapped = Exported(model, cfg, temperature).eval()
    example = torch.randint(0, 256, (2, *PATCH_SHAPE), dtype=torch.uint8)
    with torch.no_grad():
        traced = torch.jit.trace(wrapped, example, check_trace=False)
    # torch.export: TorchScript's successor (TorchScript is deprecated from torch 2.9 on)
    program = torch.export.export(wrapped, (example,), dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
    out_dir = Path(out_dir)
    with atomic_path(out_dir / "model.ts") as tmp:
        traced.save(str(tmp))
    with atomic_path(out_dir / "model.pt2") as tmp:
        torch.export.save(program, str(tmp))
    with atomic_path(out_dir / "weights.pt") as tmp:
        torch.save(model.state_dict(), tmp)
    info = {
        "arch": cfg.model.arch,
        "head": cfg.model.head,
        "image_size": cfg.data.image_size,
        "mean": cfg.data.mean,
        "std": cfg.data.std,
        "preprocessing_source": predictor.preprocessing_source,
        "source": str(ckpt),
        "epoch": saved.epoch,
        "temperature": temperature,
        "operating_point": saved.operating_point(tta=False),
        "model.ts / model.pt2": "input uint8 (N, 96, 96, 3) RGB patches (NHWC, as decoded); output "
        "float32 (N,) P(tumour) = sigmoid((logit_1 - logit_0) / temperature); "
        "resize and normalisation inside",
        "weights.pt": "state dict of cancernet.models.classifier.build_model(model config, image_size); input float "
        "(N, 3, S, S) normalised with mean/std; output (N, 2) logits",
    }
    write_text(out_dir / "model.json", json.dumps(info, indent=2))
    return info
