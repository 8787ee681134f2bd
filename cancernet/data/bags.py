"""Bags for slide-level (MIL) training: one slide's tile features from extract-features' .h5 files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from cancernet.runtime.errors import DataError


def read_slide_labels(path: str | Path, features: str | Path) -> pd.DataFrame:
    """id (the slide), label, group (its patient, or the slide), tiles: every slide of the labels
    CSV (slide,label[,patient]); slides without a feature file are refused, named, and so are
    feature files made with different settings (backbone, fingerprint, tile, resolution)."""
    path, features = Path(path), Path(features)
    if not path.is_file():
        raise DataError(f"data.slides_csv {path} does not exist (columns slide,label[,patient])")
    frame = pd.read_csv(path, dtype={"slide": str, "patient": str})
    if not {"slide", "label"} <= set(frame.columns):
        raise DataError(f"{path}: needs columns slide,label (and optionally patient)")
    frame["slide"] = frame["slide"].map(lambda s: Path(s).stem)
    if frame["slide"].duplicated().any():
        raise DataError(f"{path}: slide {frame['slide'][frame['slide'].duplicated()].iloc[0]!r} is listed twice")
    if not frame["label"].isin([0, 1]).all():
        raise DataError(f"{path}: labels must be 0 or 1")
    missing = [s for s in frame["slide"] if not (features / f"{s}.h5").is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(
            f"{len(missing)} slide(s) of {path} have no feature file in data.features={features}: {shown} "
            "(run extract-features on them, or leave them out of the labels)"
        )
    import h5py

    tiles, made = [], {}
    for s in frame["slide"]:
        with h5py.File(features / f"{s}.h5", "r") as f:
            tiles.append(f["features"].shape[0])
            made.setdefault(f.attrs.get("settings", "{}"), s)
    if len(made) > 1:  # features of two backbones (or resolutions) in one run would train silently on both
        (a, first), (b, second) = list(made.items())[:2]
        differ = sorted(
            k for k in set(json.loads(a)) | set(json.loads(b)) if json.loads(a).get(k) != json.loads(b).get(k)
        )
        raise DataError(
            f"data.features={features}: slides {first} and {second} were extracted with different settings "
            f"({', '.join(differ)}); extract them all alike"
        )
    group = frame["patient"] if "patient" in frame.columns else frame["slide"]
    return pd.DataFrame(
        {"id": frame["slide"], "label": frame["label"].astype(np.int64), "group": group.to_numpy(), "tiles": tiles}
    )


def slide_table(d) -> pd.DataFrame:
    """read_slide_labels of a slide-level run's data section, or a ConfigError naming the key."""
    from cancernet.runtime.errors import ConfigError

    for key in ("features", "slides_csv"):
        if not getattr(d, key):
            raise ConfigError(f"config key 'data.{key}' is needed by a slide-level run (model.mil)")
    return read_slide_labels(d.slides_csv, d.features)


class Bags(Dataset):
    """Item i, or (i, epoch): (features (n, D) float16 as stored, label, i) of slide i. With
    max_instances (training), at most that many of its tiles, drawn without replacement from
    (seed, epoch, i): the same draw on every rank and after a resume. The epoch comes with the
    index, so persistent loader workers need not be told it."""

    def __init__(self, folder: str | Path, ids: list[str], labels: np.ndarray, max_instances=None, seed: int = 0):
        self.folder, self.ids = Path(folder), list(ids)
        self.labels = torch.tensor(np.asarray(labels), dtype=torch.int64)
        self.max_instances, self.seed = max_instances, seed

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: int | tuple[int, int]):
        import h5py

        i, epoch = key if isinstance(key, tuple) else (key, 0)
        with h5py.File(self.folder / f"{self.ids[i]}.h5", "r") as f:
            n = f["features"].shape[0]
            if self.max_instances and n > self.max_instances:
                rng = np.random.default_rng([self.seed, epoch, i])
                feats = f["features"][np.sort(rng.choice(n, self.max_instances, replace=False))]
            else:
                feats = f["features"][:]
        return torch.from_numpy(feats), self.labels[i], i  # float16: half the bytes from the workers


class Order(Sampler):
    """A loader's order, set before each pass (a persistent-worker loader keeps its sampler)."""

    def __init__(self, items=()):
        self.items = list(items)

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def bag_loader(bags: Bags, sampler, num_workers: int):
    """One bag at a time; the workers (fork server) live as long as the loader."""
    from torch.utils.data import DataLoader

    from cancernet.runtime.signals import loader_workers

    workers = loader_workers(num_workers)
    return DataLoader(bags, batch_size=None, sampler=sampler, persistent_workers=num_workers > 0, **workers)


class BalancedBags(Sampler):
    """Training order for one rank, one bag a step: each step's bags (one per rank) are of similar
    size, so no rank waits for another's huge slide. Bags are sorted by size (ties shuffled per
    epoch), cut into groups of world_size, the groups shuffled; rank r takes the r-th bag of each
    group. The last group is filled from the start (every rank takes the same number of steps)."""

    def __init__(self, sizes: np.ndarray, rank: int, world_size: int, seed: int):
        self.sizes, self.rank, self.world, self.seed, self.epoch = np.asarray(sizes), rank, world_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def groups(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = np.lexsort((rng.random(len(self.sizes)), -self.sizes))  # by size, ties in random order
        steps = -(-len(order) // self.world)
        order = np.concatenate([order, order[: steps * self.world - len(order)]])
        return order.reshape(steps, self.world)[rng.permutation(steps)]

    def __iter__(self):
        return iter(self.groups()[:, self.rank].tolist())

    def __len__(self) -> int:
        return -(-len(self.sizes) // self.world)


def write_synthetic_bags(
    out: str | Path, n: int, dim: int = 32, tiles: tuple[int, int] = (120, 300), focus: float = 0.03, seed: int = 0
) -> pd.DataFrame:
    """n feature files as extract-features writes them, half of them positive: a positive
    slide's tumour focus is `focus` of its tiles, shifted along one direction of feature space
    (`tumour` holds their indices, the truth a test checks attention against). Returns the
    labels table (slide,label,patient; two slides per patient)."""
    import h5py

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    direction *= 6.0 / np.linalg.norm(direction)
    rows = []
    for i in range(n):
        label, count = i % 2, int(rng.integers(*tiles))
        feats = rng.normal(size=(count, dim))
        tumour = np.sort(rng.choice(count, max(1, round(focus * count)), replace=False)) if label else np.zeros(0, int)
        feats[tumour] += direction
        with h5py.File(out / f"slide_{i:03d}.h5", "w") as f:
            f.create_dataset("features", data=feats.astype(np.float16))
            f.create_dataset("coords", data=np.stack([np.arange(count) * 224, np.zeros(count)], 1).astype(np.int64))
            f.create_dataset("tumour", data=tumour)
            f.attrs["settings"] = json.dumps({"backbone": "synthetic", "fingerprint": f"seed {seed}", "dim": dim})
        rows.append({"slide": f"slide_{i:03d}", "label": label, "patient": f"p{i // 2:03d}"})
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "labels.csv", index=False)
    return frame
