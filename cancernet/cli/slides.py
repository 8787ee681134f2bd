"""Commands for whole slides: predict-slide, evaluate-slides, extract-features, view."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from cancernet.cli.options import (
    calibration_option,
    device_options,
    positional,
    slide_mpp_option,
    takes_overrides,
    tta_option,
)
from cancernet.runtime.console import setup_logging
from cancernet.runtime.errors import UserError

log = logging.getLogger("cancernet")


def _checkpoint(args, dist):
    """The checkpoint as rank 0 read it (with its sha256), once: a patch or a slide-level model."""
    from cancernet.engine import checkpoint
    from cancernet.engine.inference import sha256_of

    return checkpoint.read_on_main(args.checkpoint, dist, extra=lambda: {"sha256": sha256_of(args.checkpoint)})


def _session(args):
    """The process group of a slide command, with its --timeout."""
    from cancernet.config import parse_duration
    from cancernet.runtime.distributed import session

    return session(args.device, "auto", parse_duration(args.timeout, "--timeout") / 60)


def slide_scorer(args, dist, ckpt):
    """Either kind of checkpoint as a slide scorer (what predict-slide and evaluate-slides call)."""
    from cancernet.config import SLIDE

    return _slide_model(args, dist, ckpt) if ckpt.task == SLIDE else _scorer(args, dist, ckpt)


def _scorer(args, dist, ckpt):
    from cancernet.engine.numerics import resolve_amp
    from cancernet.wsi.heatmap import load_scorer

    overrides = list(args.overrides)
    if args.stride is not None:
        overrides.append(f"slide.stride={args.stride}")
    if args.progress is not None:
        overrides.append(f"train.progress={args.progress}")
    amp, _ = resolve_amp(args.amp, dist.device)
    return load_scorer(
        args.checkpoint,
        dist,
        overrides,
        args.train_mpp,
        ckpt,
        calibrated=not args.no_calibration,
        threshold=args.threshold,
        tta=args.tta,
        amp=amp,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        tiff=args.tiff,
        geojson=args.geojson,
    )


PATCH_ONLY = {  # predict-slide options that a slide-level (MIL) checkpoint has no use for
    "tta": "--tta",
    "stride": "--stride",
    "train_mpp": "--train-mpp",
    "tiff": "--tiff",
    "geojson": "--geojson",
    "overrides": "key=value overrides",
}


def _slide_model(args, dist, ckpt):
    """A MIL checkpoint with its features' backbone; patch-only options are refused."""
    from cancernet.engine.numerics import resolve_amp
    from cancernet.wsi.diagnose import load_slide_model

    given = [flag for key, flag in PATCH_ONLY.items() if flag and getattr(args, key, None)]
    if given:
        raise UserError(
            f"{', '.join(given)}: not for a slide-level (MIL) checkpoint, which reads the tiles its features "
            "were made from; for a tumour map or regions, run predict-slide with a patch checkpoint"
        )
    amp, _ = resolve_amp(args.amp, dist.device)
    return load_slide_model(
        ckpt,
        dist,
        backbone=args.backbone,
        threshold=args.threshold,
        calibrated=not args.no_calibration,
        amp=amp,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
    )


def _outcome(rows: list[dict], out, dist) -> int:
    """One line on rank 0 (and the failed slides'), the exit code: 1 when a slide failed."""
    failed = [r for r in rows if r["status"] == "failed"]
    if dist.is_main:
        done = sum(r["status"] == "done" for r in rows)
        log.info(
            "%d slides: %d done, %d done before, %d failed -> %s",
            len(rows),
            done,
            len(rows) - done - len(failed),
            len(failed),
            out,
        )
        if failed:
            shown = "; ".join(r["path"] for r in failed[:5]) + (
                f" and {len(failed) - 5} more" if len(failed) > 5 else ""
            )
            print(f"error: {len(failed)} of {len(rows)} slides failed: {shown}", file=sys.stderr)
        if done or len(rows) > len(failed):
            log.info("results: open %s (a line per slide, naming its outputs)", Path(out) / "slides.csv")
            if (Path(out) / (rows[0]["slide"] if rows else "") / "slide.json").is_file():
                log.info("in the browser: python -m cancernet view %s", out)
    return 1 if failed else 0


def cmd_predict_slide(args) -> int:
    from pathlib import Path

    from cancernet.wsi.driver import drive, list_slides

    with _session(args) as dist:
        setup_logging(dist.rank)
        scorer = slide_scorer(args, dist, _checkpoint(args, dist))
        out = Path(args.out)
        rows = drive(scorer.job(out, args.mpp), list_slides(args.slides), out, dist)
        return _outcome(rows, args.out, dist)


def cmd_evaluate_slides(args) -> int:
    from pathlib import Path

    from cancernet.wsi.slide_eval import evaluate_slides

    with _session(args) as dist:
        setup_logging(dist.rank)
        scorer = slide_scorer(args, dist, _checkpoint(args, dist))
        metrics = evaluate_slides(
            scorer,
            args.slides,
            Path(args.labels),
            Path(args.out),
            args.masks and Path(args.masks),
            args.mask_downsample,
            args.mpp,
        )
        return 1 if metrics and metrics["failed"] else 0


def cmd_extract_features(args) -> int:
    import dataclasses
    from pathlib import Path

    from cancernet.config import load_config
    from cancernet.engine.numerics import resolve_amp
    from cancernet.wsi.driver import list_slides
    from cancernet.wsi.extract import Reading, extract_features, load_encoder

    if (args.arch is None) == (args.checkpoint is None):
        raise UserError("extract-features needs one of --arch (a backbone's name) or --checkpoint (a trained model)")
    overrides = list(args.overrides) + ([f"model.arch={args.arch}"] if args.arch else [])
    cfg = load_config(args.config, overrides)
    with _session(args) as dist:
        setup_logging(dist.rank)
        encoder = load_encoder(dist, args.checkpoint, cfg, args.tile_mpp, args.tile)
        slide_cfg = dataclasses.replace(cfg.slide, stride=args.stride or encoder.tile)
        amp, _ = resolve_amp(args.amp, dist.device)
        reading = Reading(slide_cfg, args.mpp, args.batch_size, args.num_workers, amp)
        rows = extract_features(encoder, list_slides(args.slides), Path(args.out), dist, reading, args.part)
        return _outcome(rows, args.out, dist)


def cmd_view(args) -> int:
    from cancernet.wsi.viewer import make_server

    server = make_server(Path(args.folder), args.host, args.port)
    host, port = server.server_address[:2]
    log.info("serving %s on http://%s:%d/  (Ctrl-C to stop)", args.folder, host, port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped")
    finally:
        server.server_close()
    return 0


def timeout_option(p) -> None:
    from cancernet.config import DistConfig

    default = f"{DistConfig.timeout_min}m"
    p.add_argument(
        "--timeout",
        default=default,
        help=f"the process group's timeout under torchrun (default {default}, dist.timeout_min's); 90s, 30m, 2h",
    )


def _part(text: str) -> tuple[int, int]:
    import argparse

    try:
        k, n = map(int, text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not K/N (e.g. 0/8)") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"{text}: K must be 0..N-1")
    return k, n


def _slide_options(p) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="a patch model's or a slide-level (MIL) model's checkpoint (best.pt)"
    )
    p.add_argument("--out", required=True, help="folder: one sub-folder of outputs per slide")
    tta_option(p)
    p.add_argument("--stride", type=int, default=None, help="tile step in training pixels (slide.stride, default 32)")
    slide_mpp_option(p)
    p.add_argument(
        "--train-mpp",
        type=float,
        default=None,
        help="the patch resolution the model was trained at, for checkpoints without data.mpp",
    )
    p.add_argument("--tiff", action="store_true", help="also write heatmap.tif, a pyramidal TIFF QuPath can overlay")
    p.add_argument(
        "--geojson",
        action="store_true",
        help="also write tumour.geojson: regions above the operating point as polygons (level-0 px) QuPath imports",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="for the tumour area (default: the checkpoint's validation-chosen operating point)",
    )
    calibration_option(p)
    p.add_argument(
        "--backbone",
        default=None,
        help="a MIL checkpoint's feature backbone checkpoint, where it is now if it moved (checked by fingerprint)",
    )
    device_options(p, "slide-reading processes")
    timeout_option(p)
    p.add_argument(
        "--progress", choices=["auto", "on", "off"], default=None, help="a progress bar per slide (auto: on a terminal)"
    )
    takes_overrides(p, "slide.score=max")


def register(sub) -> None:
    p = sub.add_parser(
        "predict-slide",
        help="a checkpoint over whole slides (OpenSlide): tumour heatmaps, tiles.csv, slide.json per "
        "slide, or with a MIL checkpoint the slide's probability and attention map; a folder resumes where it stopped",
    )
    positional(p, "slides", "slide files or folders of slides", many=True)
    _slide_options(p)
    p.set_defaults(func=cmd_predict_slide)
    p = sub.add_parser(
        "evaluate-slides",
        help="slide-level ROC AUC (bootstrap CI) and cell-level AUC against "
        "tumour masks, over a folder of labelled slides",
    )
    positional(p, "slides", "slide files or folders of slides", many=True)
    p.add_argument("--labels", required=True, help="CSV slide,label (slide: file name or stem; 1 = tumour)")
    p.add_argument("--masks", default=None, help="folder of tumour masks <slide>.png (nonzero = tumour)")
    p.add_argument("--mask-downsample", type=float, default=None, help="level-0 pixels per mask pixel")
    _slide_options(p)
    p.set_defaults(func=cmd_evaluate_slides)
    p = sub.add_parser(
        "extract-features",
        help="a backbone's features of every tissue tile of each slide, one .h5 per slide (for MIL); "
        "torchrun deals the slides out over the ranks; a folder resumes where it stopped",
    )
    positional(p, "slides", "slide files or folders of slides", many=True)
    p.add_argument("--out", required=True, help="folder: <slide>.h5 per slide and slides.csv")
    p.add_argument("--arch", default=None, help="a backbone (model.arch: torchvision, timm:NAME, hf-hub:ORG/NAME)")
    p.add_argument("--checkpoint", default=None, help="or a trained patch model's backbone (best.pt)")
    p.add_argument("--config", default="base", help="config the --arch backbone is built with (model.*, data.*)")
    p.add_argument(
        "--tile-mpp",
        type=float,
        default=None,
        help="microns per pixel tiles are read at (default: the checkpoint's data.mpp, or 0.5 for --arch)",
    )
    p.add_argument(
        "--tile",
        type=int,
        default=None,
        help="tile side in px (default: 96 for a checkpoint, else the weights' input size)",
    )
    p.add_argument("--stride", type=int, default=None, help="tile step in px (default: the tile: non-overlapping)")
    p.add_argument(
        "--part",
        type=_part,
        default=(0, 1),
        metavar="K/N",
        help="only slides K, K+N, K+2N, ... of the sorted list: task K of a Slurm array of N (slurm/extract.sbatch)",
    )
    slide_mpp_option(p)
    device_options(p, "slide-reading processes")
    timeout_option(p)
    takes_overrides(p, "model.pretrained=none")
    p.set_defaults(func=cmd_extract_features)
    p = sub.add_parser(
        "view",
        help="a predict-slide or evaluate-slides output in the browser: the slides in deep zoom, the map over them",
    )
    positional(p, "folder", "predict-slide's or evaluate-slides' --out folder")
    p.add_argument("--port", type=int, default=8765, help="the port to serve on (0: any free one)")
    p.add_argument("--host", default="127.0.0.1", help="the address to serve on (0.0.0.0: every interface)")
    p.set_defaults(func=cmd_view)
