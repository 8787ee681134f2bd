"""python -m cancernet {synth,prepare,evaluate,predict,export,bench,fetch-weights,link-pcam,audit,aggregate,
predict-slide,evaluate-slides,synth-slides}: the commands
besides training (also installed as the `cancernet` console script)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from cancernet.runtime.console import main_guard, setup_logging

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


def cmd_fetch_weights(args) -> int:
    from cancernet.models.archs import check_arch, is_timm
    from cancernet.models.classifier import imagenet_state_dict

    for arch in args.arch:
        check_arch(arch, "--arch")
        if is_timm(arch):
            from cancernet.models import timm as timm_models

            folder = timm_models.fetch(arch)
            repo = folder.parents[1]  # .../hub/models--ORG--NAME/snapshots/<revision>
            log.info(
                "%s is in the Hugging Face cache: %s. On a cluster without internet copy %s to the same place "
                "under its HF_HOME (or share HF_HOME), and run with HF_HUB_OFFLINE=1",
                arch,
                folder,
                repo,
            )
        else:
            imagenet_state_dict(arch, args.mirror)
            log.info("ImageNet weights for %s are in the torch hub cache (TORCH_HOME)", arch)
    return 0


def cmd_evaluate(args) -> int:
    from cancernet.engine.rundir import RunDir
    from cancernet.evaluate.evaluation import Request, evaluate_checkpoint, open_run
    from cancernet.runtime.distributed import session

    run = RunDir(args.run)
    cfg = run.load_config(args.overrides)
    with session(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_min) as dist:
        setup_logging(dist.rank)
        evaluate_checkpoint(
            open_run(run, cfg, dist, args.split),
            run.checkpoint(args.checkpoint),
            Request(args.split, args.tta, args.target_sensitivity, args.calibrate),
        )
    return 0


def cmd_predict(args) -> int:

    from cancernet.engine.numerics import resolve_amp
    from cancernet.evaluate import inference
    from cancernet.runtime.atomic import write_text
    from cancernet.runtime.distributed import session

    with session(args.device, "auto") as dist:
        setup_logging(dist.rank)
        ids, paths = inference.list_images(args.images, args.ids)
        model, cfg, ckpt = inference.load_model(args.checkpoint, dist.device)
        temperature = ckpt.temperature(not args.no_calibration)
        threshold = (
            inference.checkpoint_threshold(ckpt, args.tta, temperature)
            if args.threshold_from_checkpoint
            else args.threshold
        )
        amp, _ = resolve_amp(args.amp, dist.device)
        start = time.perf_counter()
        probs = inference.predict_folder(
            model, cfg, dist, paths, args.batch_size, args.num_workers, args.tta, amp, temperature
        )
        if dist.is_main:
            write_text(args.out, inference.submission(ids, probs, threshold).to_csv(index=False, float_format="%.8g"))
            log.info(
                "wrote %d predictions%s to %s in %.1fs (%.0f patches/s; temperature %.3g)",
                len(ids),
                f" (labels at threshold {threshold:.4f})" if threshold is not None else "",
                args.out,
                time.perf_counter() - start,
                len(ids) / (time.perf_counter() - start),
                temperature,
            )
    return 0


def cmd_export(args) -> int:
    from cancernet.evaluate.inference import EXPORT_FILES, export

    info = export(args.checkpoint, args.out, calibrated=not args.no_calibration)
    log.info(
        "exported %s (%s, temperature %.3g) to %s: %s",
        args.checkpoint,
        info["arch"],
        info["temperature"],
        args.out,
        ", ".join(EXPORT_FILES),
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


def cmd_audit(args) -> int:
    import json

    from cancernet.engine.loaders import load_table
    from cancernet.engine.rundir import RunDir
    from cancernet.evaluate.audit import audit_run, describe
    from cancernet.runtime.atomic import write_text
    from cancernet.runtime.distributed import DistInfo
    from cancernet.runtime.errors import UserError

    run = RunDir(args.run)
    cfg = run.load_config(args.overrides)
    saved = run.read_splits()
    if saved is None:
        raise UserError(f"{run.root} has no splits.csv: nothing to audit")
    table, _ = load_table(cfg, DistInfo(), saved)
    audit = audit_run(cfg, table)
    write_text(run.report / "audit.json", json.dumps(audit, indent=1))
    log.info("%s", describe(audit))
    print(json.dumps(audit, indent=1))
    return 0


def cmd_aggregate(args) -> int:
    from pathlib import Path

    from cancernet.evaluate.aggregate import aggregate

    out = Path(args.out) if args.out else Path(args.runs[0]).parent / "aggregate"
    summary = aggregate(args.runs, out)
    auc = summary["metrics"]["roc_auc"]
    log.info(
        "%d runs: test AUC %.4f ± %.4f (SD); %s validation AUC %.4f -> %s",
        summary["runs"],
        auc["mean"],
        auc["sd"],
        summary["validation"]["kind"].split(":")[0],
        summary["validation"]["pooled_auc"],
        out,
    )
    return 0


def cmd_bench(args) -> int:
    import json

    from cancernet import bench
    from cancernet.config import load_config
    from cancernet.runtime.errors import UserError

    cfg = load_config(args.config, args.overrides)
    if args.what == "data":  # generators: each row is printed as soon as it is measured
        results = bench.bench_data(cfg, args.steps, paths=args.paths)
    elif args.what == "step":
        results = [bench.bench_step(cfg, args.steps, ddp=args.ddp)]
    elif args.what == "ops":
        results = [bench.bench_ops(cfg, args.batch)]
    elif args.what == "slide":
        if not args.slide:
            raise UserError("bench slide needs --slide PATH")
        results = [bench.bench_slide(cfg, args.slide)]
    else:
        results = bench.bench_train(cfg, args.steps)
    for result in results:
        print(json.dumps(result), flush=True)
    return 0


def add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic dataset in the Kaggle layout (or PCam's release layout)")
    p.add_argument("out")
    p.add_argument(
        "--format",
        choices=["kaggle", "pcam"],
        default="kaggle",
        help="kaggle: train/*.tif + train_labels.csv; pcam: the HDF5 release (x/y .h5 + meta CSVs)",
    )
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-valid", type=int, default=200, help="pcam: patches in the valid split")
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
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
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.set_defaults(func=cmd_synth)


def add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="evaluate a run's checkpoint and rewrite its report (also under torchrun: ranks share the work)",
    )
    p.add_argument("--run", required=True, help="run directory (train.out_dir)")
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--checkpoint", default="best", help="best | last | a checkpoint path")
    p.add_argument(
        "--tta",
        action="store_true",
        help="also report metrics averaged over the 8 dihedral views, with their own operating point",
    )
    p.add_argument(
        "--target-sensitivity",
        type=float,
        default=None,
        metavar="S",
        help="choose the threshold reaching sensitivity S on validation and store it in the checkpoint",
    )
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="fit a temperature on validation predictions (else the checkpoint's is kept)",
    )
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.device=cpu")
    p.set_defaults(func=cmd_evaluate)


def add_predict(sub) -> None:
    p = sub.add_parser("predict", help="predict P(tumour) for every patch of a folder (Kaggle submission CSV)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", required=True, help="folder of .tif/.png patches")
    p.add_argument("--out", required=True, help="CSV to write: id,label")
    p.add_argument(
        "--ids", default=None, help="CSV with an id column (e.g. sample_submission.csv): predict these, in this order"
    )
    p.add_argument("--tta", action="store_true", help="average over the 8 dihedral views")
    p.add_argument("--no-calibration", action="store_true", help="ignore the checkpoint's fitted temperature")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--threshold", type=float, default=None, help="write 0/1 labels at this threshold")
    group.add_argument(
        "--threshold-from-checkpoint",
        action="store_true",
        help="write 0/1 labels at the checkpoint's validation-chosen operating point",
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--amp",
        choices=["auto", "bf16", "fp16", "off"],
        default="auto",
        help="precision (auto: bf16 where the device computes it natively, as train.amp=auto)",
    )
    p.set_defaults(func=cmd_predict)


def add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="model.ts (TorchScript) and model.pt2 (torch.export) with preprocessing "
        "inside, weights.pt (state dict), model.json",
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="folder for model.ts, model.pt2, weights.pt, model.json")
    p.add_argument("--no-calibration", action="store_true", help="leave the fitted temperature out")
    p.set_defaults(func=cmd_export)


def add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="pack data.root's images (or a PCam release) into one array file")
    p.add_argument("--config", required=True)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding processes")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. data.root=/data/pcam")
    p.set_defaults(func=cmd_prepare)


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="throughput: data path, train step ceiling, real loop (JSON lines)")
    p.add_argument("what", choices=["data", "step", "train", "slide", "ops"])
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=20, help="timed batches (after a warm-up)")
    p.add_argument(
        "--paths",
        nargs="+",
        default=["folder", "packed"],
        choices=["folder", "packed"],
        help="bench data: which data paths to time",
    )
    p.add_argument(
        "--ddp",
        action="store_true",
        help="bench step: inside a DDP wrapper (one-process group), torch.compile placed by model.compile_scope",
    )
    p.add_argument("--slide", default=None, help="bench slide: the slide to predict (e.g. one of synth-slides')")
    p.add_argument("--batch", type=int, default=8, help="bench ops: the batch the step is counted on")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.batch_size=128")
    p.set_defaults(func=cmd_bench)


def add_fetch_weights(sub) -> None:
    p = sub.add_parser(
        "fetch-weights",
        help="download pretrained weights (torchvision: the torch hub cache; timm:/hf-hub: the Hugging Face "
        "cache, with HF_TOKEN for gated models) on a machine with network, e.g. a cluster's login node",
    )
    p.add_argument(
        "--arch",
        nargs="+",
        default=["resnet34"],
        help="torchvision names, timm:NAME or hf-hub:ORG/NAME (what model.arch takes)",
    )
    p.add_argument("--mirror", default=None, help="base URL holding the same file names")
    p.set_defaults(func=cmd_fetch_weights)


def add_link_audit_aggregate(sub) -> None:
    p = sub.add_parser(
        "link-pcam",
        help="the slide of every labelled Kaggle patch, from PCam's release "
        "(ids are SHA-1s of the pixels): KAGGLE_ROOT/pcam_slides.csv for data.groups_csv",
    )
    p.add_argument("kaggle_root")
    p.add_argument("pcam_release")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="hashing processes (one per split file)")
    p.set_defaults(func=cmd_link_pcam)
    p = sub.add_parser("audit", help="leak audit of a run's splits: pixels and slides in more than one split")
    p.add_argument("run", help="run directory")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. data.root=/data/pcam")
    p.set_defaults(func=cmd_audit)
    p = sub.add_parser("aggregate", help="one report over runs that differ only in seed and/or fold")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", default=None, help="folder for aggregate.json/.html/.png (default: beside the runs)")
    p.set_defaults(func=cmd_aggregate)


def _scorer(args, dist):
    from cancernet.engine.numerics import resolve_amp
    from cancernet.wsi.predict import load_scorer

    overrides = list(getattr(args, "overrides", []))
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
        calibrated=not args.no_calibration,
        threshold=args.threshold,
        tta=args.tta,
        amp=amp,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
    )


def _slides_outcome(outcome: dict, out) -> int:
    failed = outcome["failed"]
    n = sum(len(v) for v in outcome.values())
    log.info(
        "%d slides: %d done, %d done before, %d failed -> %s",
        n,
        len(outcome["done"]),
        len(outcome["skipped"]),
        len(failed),
        out,
    )
    if failed:
        print(f"error: {len(failed)} of {n} slides failed: " + "; ".join(str(p) for p, _ in failed), file=sys.stderr)
        return 1
    return 0


def cmd_predict_slide(args) -> int:
    from pathlib import Path

    from cancernet.runtime.distributed import session
    from cancernet.wsi.predict import list_slides, predict_slides

    # key=value overrides land among the slides (both positional): a path that exists is a slide
    args.overrides = [s for s in args.slides if "=" in s and not Path(s).exists()] + list(args.overrides)
    slides = [s for s in args.slides if s not in args.overrides]
    with session(args.device, "auto") as dist:
        setup_logging(dist.rank)
        scorer = _scorer(args, dist)
        outcome = predict_slides(scorer, list_slides(slides), Path(args.out), args.mpp, args.tiff)
        return _slides_outcome(outcome, args.out) if dist.is_main else (1 if outcome["failed"] else 0)


def cmd_evaluate_slides(args) -> int:
    from pathlib import Path

    from cancernet.runtime.distributed import session
    from cancernet.wsi.evaluate import evaluate_slides

    with session(args.device, "auto") as dist:
        setup_logging(dist.rank)
        scorer = _scorer(args, dist)
        metrics = evaluate_slides(
            scorer,
            Path(args.slides),
            Path(args.labels),
            Path(args.out),
            args.masks and Path(args.masks),
            args.mask_downsample,
            args.mpp,
            args.tiff,
        )
        return 1 if metrics and metrics["failed"] else 0


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


def _slide_options(p) -> None:
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="folder: one sub-folder of outputs per slide")
    p.add_argument("--tta", action="store_true", help="average over the 8 dihedral views")
    p.add_argument("--stride", type=int, default=None, help="tile step in training pixels (slide.stride, default 32)")
    p.add_argument(
        "--mpp",
        type=float,
        default=None,
        help="level-0 microns per pixel of every slide given: for slides whose metadata lack it (or are wrong)",
    )
    p.add_argument(
        "--train-mpp",
        type=float,
        default=None,
        help="the patch resolution the model was trained at, for checkpoints without data.mpp",
    )
    p.add_argument("--tiff", action="store_true", help="also write heatmap.tif, a pyramidal TIFF QuPath can overlay")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="for the tumour area (default: the checkpoint's validation-chosen operating point)",
    )
    p.add_argument("--no-calibration", action="store_true", help="ignore the checkpoint's fitted temperature")
    p.add_argument("--batch-size", type=int, default=256, help="tiles per batch (per process)")
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="slide-reading processes")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto")
    p.add_argument("--progress", choices=["auto", "on", "off"], default=None)


def add_slides(sub) -> None:
    p = sub.add_parser(
        "predict-slide",
        help="a checkpoint over whole slides (OpenSlide): tumour heatmaps, "
        "tiles.csv, slide.json per slide; a folder resumes where it stopped",
    )
    p.add_argument("slides", nargs="+", help="slide files or folders of slides (and slide.*=... overrides)")
    _slide_options(p)
    p.set_defaults(func=cmd_predict_slide, overrides=[])
    p = sub.add_parser(
        "evaluate-slides",
        help="slide-level ROC AUC (bootstrap CI) and cell-level AUC against "
        "tumour masks, over a folder of labelled slides",
    )
    p.add_argument("--slides", required=True, help="folder of slides")
    p.add_argument("--labels", required=True, help="CSV slide,label (slide: file name or stem; 1 = tumour)")
    p.add_argument("--masks", default=None, help="folder of tumour masks <slide>.png (nonzero = tumour)")
    p.add_argument("--mask-downsample", type=float, default=None, help="level-0 pixels per mask pixel")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. slide.score=max")
    _slide_options(p)
    p.set_defaults(func=cmd_evaluate_slides)
    p = sub.add_parser(
        "synth-slides",
        help="synthetic pyramidal TIFF slides with known tumour regions, their "
        "masks and slides.csv (evaluate-slides' input)",
    )
    p.add_argument("out")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--rows", type=int, default=48, help="cells (32 training px) down")
    p.add_argument("--cols", type=int, default=64, help="cells across")
    p.add_argument("--mpp", type=float, default=0.486, help="level-0 microns per pixel")
    p.add_argument("--tumour-rate", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth_slides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cancernet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        add_synth,
        add_evaluate,
        add_predict,
        add_export,
        add_prepare,
        add_bench,
        add_fetch_weights,
        add_link_audit_aggregate,
        add_slides,
    ):
        add(sub)
    return parser


def main() -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args()
    # key=value overrides may stand anywhere, also before options
    if any(x.startswith("-") or "=" not in x for x in extra) or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*extra, *args.overrides]
    setup_logging(int(os.environ.get("RANK", 0)))
    return args.func(args)


def entry() -> None:
    """The `cancernet` console script."""
    sys.exit(main_guard(main))


if __name__ == "__main__":
    entry()
