"""Commands for data: synth, prepare, link-pcam, synth-slides."""

from __future__ import annotations

import logging
import os
import time

from cancernet.cli.options import positional, takes_overrides

log = logging.getLogger("cancernet")


def cmd_synth(args) -> int:
    start = time.perf_counter()
    if args.format == "pcam":
        from cancernet.data.synthetic_pcam import write_pcam_release

        sizes = write_pcam_release(
            args.out,
            args.n_train,
            args.n_valid,
            args.n_test,
            args.seed,
            gzip_files=args.gzip,
            workers=args.workers,
            pool=args.pool,
            duplicates=args.duplicates,
            kaggle=args.kaggle,
        )
        log.info("wrote a PCam-layout release (%s) to %s in %.1fs", sizes, args.out, time.perf_counter() - start)
        return 0
    from cancernet.data.synthetic import write_dataset

    frame = write_dataset(args.out, args.n_train, args.n_test, args.seed, pool=args.pool, workers=args.workers)
    log.info(
        "wrote %d train (%.1f%% positive) and %d test patches to %s in %.1fs",
        len(frame),
        100 * frame["label"].mean(),
        args.n_test,
        args.out,
        time.perf_counter() - start,
    )
    return 0


def cmd_prepare(args) -> int:
    from cancernet.config import load_config
    from cancernet.data.formats import prepare

    cfg = load_config(args.config, args.overrides)
    prepare(cfg.data, args.workers)
    return 0


def cmd_link_pcam(args) -> int:
    import json

    from cancernet.data.link import link_pcam

    print(json.dumps(link_pcam(args.kaggle_root, args.pcam_release, args.workers), indent=1))
    return 0


def cmd_synth_slides(args) -> int:
    from cancernet.wsi.synthetic import write_slide_set

    start = time.perf_counter()
    frame = write_slide_set(args.out, args.n, args.rows, args.cols, args.mpp, args.seed, args.tumour_rate)
    log.info(
        "wrote %d synthetic slides (%d with tumour) to %s in %.1fs",
        len(frame),
        frame["label"].sum(),
        args.out,
        time.perf_counter() - start,
    )
    return 0


def register(sub) -> None:
    _add_synth(sub)
    _add_prepare(sub)
    _add_link_pcam(sub)
    _add_synth_slides(sub)


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic dataset in the Kaggle layout (or PCam's release layout)")
    positional(p, "out", "folder to write (train_labels.csv, train/, test/; or the PCam files)")
    p.add_argument(
        "--format",
        choices=["kaggle", "pcam"],
        default="kaggle",
        help="kaggle: train/*.tif + train_labels.csv; pcam: the HDF5 release (x/y .h5 + meta CSVs)",
    )
    p.add_argument("--n-train", type=int, default=2000, help="labelled patches (train/ and train_labels.csv)")
    p.add_argument("--n-valid", type=int, default=200, help="pcam: patches in the valid split")
    p.add_argument("--n-test", type=int, default=200, help="unlabelled patches (test/), as Kaggle's")
    p.add_argument("--seed", type=int, default=0, help="random seed (the same seed writes the same set)")
    p.add_argument("--gzip", action="store_true", help="pcam: write .h5.gz files, as the release is distributed")
    p.add_argument(
        "--duplicates",
        type=float,
        default=0.0,
        metavar="F",
        help="pcam: this share of the patches repeat an earlier one exactly (PCam has such duplicates)",
    )
    p.add_argument(
        "--kaggle",
        default=None,
        metavar="DIR",
        help="pcam: also write the Kaggle-layout set the release becomes (each patch once, SHA-1 ids)",
    )
    p.add_argument(
        "--pool",
        type=int,
        default=None,
        help="render only this many distinct patches and reuse them (fast scale tests)",
    )
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="writing processes")
    p.set_defaults(func=cmd_synth)


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="pack data.root's images (or a PCam release) into one array file")
    p.add_argument(
        "--config", default=None, help="a YAML file or a shipped config's name, for its data: section (default: none)"
    )
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding processes")
    takes_overrides(p, "data.root=/data/pcam")
    p.set_defaults(func=cmd_prepare)


def _add_link_pcam(sub) -> None:
    p = sub.add_parser(
        "link-pcam",
        help="the slide of every labelled Kaggle patch, from PCam's release "
        "(ids are SHA-1s of the pixels): KAGGLE_ROOT/pcam_slides.csv for data.groups_csv",
    )
    p.add_argument("kaggle_root", help="the Kaggle set's folder (train_labels.csv, train/)")
    p.add_argument("pcam_release", help="PCam's release folder (camelyonpatch_level_2_split_*.h5[.gz], meta CSVs)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="hashing processes (one per split file)")
    p.set_defaults(func=cmd_link_pcam)


def _add_synth_slides(sub) -> None:
    p = sub.add_parser(
        "synth-slides",
        help="synthetic pyramidal TIFF slides with known tumour regions, their "
        "masks and slides.csv (evaluate-slides' input)",
    )
    positional(p, "out", "folder to write: slides/<name>.tif, masks/<name>.png, slides.csv")
    p.add_argument("--n", type=int, default=4, help="slides to write")
    p.add_argument("--rows", type=int, default=48, help="cells (32 training px) down")
    p.add_argument("--cols", type=int, default=64, help="cells across")
    p.add_argument("--mpp", type=float, default=0.486, help="level-0 microns per pixel")
    p.add_argument("--tumour-rate", type=float, default=0.5, help="share of slides with a tumour region")
    p.add_argument("--seed", type=int, default=0, help="random seed (the same seed writes the same slides)")
    p.set_defaults(func=cmd_synth_slides)
