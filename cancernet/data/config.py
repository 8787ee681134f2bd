"""The `data:` section of the config: where the patches are and how they are read and augmented."""

from __future__ import annotations

from dataclasses import dataclass

from cancernet.data.patch import PATCH_MPP
from cancernet.runtime.schema import bounded, choice


@dataclass
class DataConfig:
    root: str = "data/synthetic"  # the dataset folder (Kaggle's layout, or PCam's HDF5 files with format pcam)
    format: str = "folder"  # data/formats.py: folder | packed | pcam
    packed_dir: str | None = None  # default: <root>/packed
    stage_dir: str | None = None  # node-local folder ($SLURM_TMPDIR, /dev/shm) the pack is copied to and read from
    image_size: int | None = bounded(96, 8)  # null: the weights' input size
    crop: int | None = bounded(None, 8, 96)  # centre square cut from each patch before the resize; null = whole
    num_workers: int | None = bounded(None, 0)  # loader processes per rank; null: from the cores (per rank, less one)
    val_fraction: float = bounded(0.15, 0, 1, hi_open=True)  # validation share (stratified; by group with groups_csv)
    test_fraction: float = bounded(0.15, 0, 1, hi_open=True)  # test share, held out for the final report
    limit: int | None = bounded(None, 1)  # use the first N labelled images (null: all)
    groups_csv: str | None = None  # id,group (e.g. patch -> slide); a group never spans two splits
    split_by: str = choice("random", "random", "pcam")  # pcam: PCam's own splits, from link-pcam's groups_csv
    folds: int = bounded(1, 1)  # > 1: train+val rotate over this many (grouped, stratified) folds
    fold: int = bounded(0, 0)  # which fold validates
    split_seed: int | None = bounded(None, 0)  # seeds the splits and folds; null: train.seed
    on_bad_image: str = choice("fail", "fail", "skip")  # an unreadable image stops the run, or is skipped and listed
    verify_ids: str = choice("auto", "auto", "on", "off")  # each patch's pixels hash to its id (Kaggle's SHA-1s)
    augment: str = choice("dihedral", "dihedral", "seed", "none")  # seed = hflip + rotation +-10 deg
    jitter: float = bounded(0.1, 0, 1)  # brightness/contrast/saturation strength; 0 = off
    hue: float = bounded(0.02, 0, 0.5)  # hue jitter strength; 0 = off
    stain: str = choice("none", "none", "hed")  # HED stain augmentation (Tellez et al. 2019)
    stain_sigma: float = bounded(0.05, 0, 1)  # per-stain scale drawn from U(1 - sigma, 1 + sigma)
    stain_bias: float = bounded(0.01, 0, 1)  # per-stain shift drawn from U(-bias, bias)
    mpp: float = bounded(PATCH_MPP, 0)  # microns per pixel of the patches (Kaggle/PCam: 10x); slides are read at it
    features: str | None = None  # slide-level (MIL) runs: extract-features' folder of <slide>.h5
    slides_csv: str | None = None  # slide-level runs: slide,label[,patient] (a patient's slides stay in one split)
    max_instances: int | None = bounded(4096, 1)  # tiles a training bag samples at most (evaluation: all)
    mean: list[float] | None = None  # null: what the weights expect (timm's pretrained config; ImageNet's)
    std: list[float] | None = None  # null: what the weights expect
