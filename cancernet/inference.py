"""Inference from a checkpoint: predict a folder (Kaggle submission), operating point, export."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from . import checkpoint
from .atomic import atomic_path, write_text
from .config import Config, from_dict
from .data.augment import Augment
from .data.datasets import FolderDataset, ShardSampler
from .data.kaggle import DataError
from .distributed import DistInfo
from .engine import evaluate
from .errors import UserError
from .models import build_model

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".tif", ".tiff", ".png")


def load_model(path: str | Path, device: torch.device) -> tuple[nn.Module, Config, dict]:
    """The model of a checkpoint, in eval mode, with the config it was trained with."""
    state = checkpoint.load(path)
    cfg = from_dict(state["config"])
    model = build_model(dataclasses.replace(cfg.model, pretrained="none"))  # weights come from state
    checkpoint.load_model_state(model, state, path)
    return model.to(device).eval(), cfg, state


def list_images(folder: str | Path, ids_csv: str | Path | None) -> tuple[list[str], list[Path]]:
    """ids and paths: every .tif/.png of folder (sorted), or the ids of ids_csv in its order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--images {folder} is not a folder")
    found = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    if ids_csv is None:
        if not found:
            raise DataError(f"no .tif or .png images in {folder}")
        return list(found), list(found.values())
    ids_frame = pd.read_csv(ids_csv, dtype={"id": str})
    if "id" not in ids_frame.columns:
        raise DataError(f"--ids {ids_csv} has no 'id' column")
    ids = ids_frame["id"].tolist()
    duplicated = ids_frame["id"][ids_frame["id"].duplicated()]
    if len(duplicated):
        raise DataError(f"--ids {ids_csv} lists id {duplicated.iloc[0]!r} twice")
    missing = [i for i in ids if i not in found]
    if missing:
        raise DataError(f"image for id {missing[0]!r} not found in {folder} as .tif or .png "
                        f"({len(missing)} of {len(ids)} missing)")
    return ids, [found[i] for i in ids]


def predict_folder(model: nn.Module, cfg: Config, dist: DistInfo, paths: list[Path], batch_size: int,
                   num_workers: int, tta: bool, amp: str) -> np.ndarray:
    """P(tumour) of every path, in order; ranks share the work, every rank gets all of it."""
    dataset = FolderDataset(paths, None, Augment(cfg.data, train=False, channels_last=cfg.model.channels_last))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        sampler=ShardSampler(len(dataset), dist.rank, dist.world_size),
                        pin_memory=dist.device.type == "cuda")
    result = evaluate(model, loader, dist, amp, tta=tta)
    return result["prob"]


def submission(ids: list[str], probs: np.ndarray, threshold: float | None) -> pd.DataFrame:
    """Kaggle's format: id,label with label = P(tumour), or a 0/1 label at a threshold."""
    label = probs if threshold is None else (probs >= threshold).astype(int)
    return pd.DataFrame({"id": ids, "label": label})


def checkpoint_threshold(state: dict, path: Path) -> float:
    point = state.get("operating_point")
    if not point:
        raise UserError(f"checkpoint {path} holds no operating point; run `python -m cancernet evaluate "
                        "--run RUN [--target-sensitivity S]` first, or pass --threshold")
    return float(point["threshold"])


def store_operating_point(path: Path, point: dict) -> None:
    """Add the validation-chosen threshold to a checkpoint (atomic rewrite)."""
    state = checkpoint.load(path)
    state["operating_point"] = point
    checkpoint.save(path, state)


class Exported(nn.Module):
    """uint8 NHWC patches (N, 96, 96, 3) in, P(tumour) (N,) out: preprocessing inside."""

    def __init__(self, model: nn.Module, cfg: Config):
        super().__init__()
        self.model = model
        self.size = cfg.data.image_size
        self.register_buffer("mean", torch.tensor(cfg.data.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.data.std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() / 255
        if x.shape[-1] != self.size:
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                          align_corners=False, antialias=x.shape[-1] > self.size)
        x = (x - self.mean) / self.std
        return self.model(x).softmax(1)[:, 1]


def export(ckpt: Path, out_dir: Path) -> dict:
    """model.ts (TorchScript) and model.pt2 (torch.export), both with preprocessing inside;
    weights.pt (plain state dict); model.json (what they expect and return)."""
    model, cfg, state = load_model(ckpt, torch.device("cpu"))
    wrapped = Exported(model, cfg).eval()
    example = torch.randint(0, 256, (2, 96, 96, 3), dtype=torch.uint8)
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
    info = {"arch": cfg.model.arch, "head": cfg.model.head, "image_size": cfg.data.image_size,
            "mean": cfg.data.mean, "std": cfg.data.std, "source": str(ckpt), "epoch": state["epoch"],
            "operating_point": state.get("operating_point"),
            "model.ts / model.pt2": "input uint8 (N, 96, 96, 3) RGB patches (NHWC, as decoded); output "
                                    "float32 (N,) P(tumour); resize and normalisation inside",
            "weights.pt": "state dict of cancernet.models.build_model(arch, head); input float "
                          "(N, 3, S, S) normalised with mean/std; output (N, 2) logits"}
    write_text(out_dir / "model.json", json.dumps(info, indent=2))
    return info
