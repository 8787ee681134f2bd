"""Commands for runs and patches: evaluate, predict, export, audit, aggregate."""

from __future__ import annotations

import logging

from cancernet.cli.options import calibration_option, device_options, positional, takes_overrides, tta_option
from cancernet.runtime.console import setup_logging
from cancernet.runtime.errors import UserError

log = logging.getLogger("cancernet")


def cmd_evaluate(args) -> int:
    from cancernet.config import SLIDE, task_kind
    from cancernet.engine.rundir import RunDir
    from cancernet.evaluate.patch_eval import Request, evaluate_checkpoint, open_run
    from cancernet.runtime.distributed import session

    run = RunDir(args.run)
    cfg = run.load_config(args.overrides)
    if task_kind(cfg) == SLIDE:
        raise UserError(
            f"{args.run} is a slide-level (MIL) run: its test report is written when training ends "
            f"({run.metrics}); labelled slides of elsewhere: evaluate-slides --checkpoint {run.best}"
        )
    with session(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_min) as dist:
        setup_logging(dist.rank)
        evaluate_checkpoint(
            open_run(run, cfg, dist, args.split),
            run.checkpoint(args.checkpoint),
            Request(args.split, args.tta, args.target_sensitivity, args.calibrate),
        )
    return 0


def cmd_predict(args) -> int:
    from cancernet.evaluate.patch_predict import predict_to_csv
    from cancernet.runtime.distributed import session

    with session(args.device, "auto") as dist:
        setup_logging(dist.rank)
        predict_to_csv(
            args.checkpoint,
            args.images,
            args.out,
            dist,
            ids_csv=args.ids,
            tta=args.tta,
            calibrated=not args.no_calibration,
            threshold=args.threshold,
            threshold_from_checkpoint=args.threshold_from_checkpoint,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            amp=args.amp,
        )
    return 0


def cmd_export(args) -> int:
    from cancernet.evaluate.patch_predict import EXPORT_FILES, export

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


def cmd_audit(args) -> int:
    import json

    from cancernet.evaluate.audit import audit_saved_run, describe

    audit = audit_saved_run(args.run, args.overrides)
    log.info("%s", describe(audit))
    print(json.dumps(audit, indent=1))
    return 0


def cmd_aggregate(args) -> int:
    from pathlib import Path

    from cancernet.evaluate.aggregate import aggregate

    out = Path(args.out) if args.out else Path(args.runs[0]).parent / "aggregate"
    log_aggregate(aggregate(args.runs, out), out)
    return 0


def log_aggregate(summary: dict, out) -> None:
    """The aggregate's line: test AUC mean and SD over the runs, the pooled validation AUC, where it is."""
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


def register(sub) -> None:
    _add_evaluate(sub)
    _add_predict(sub)
    _add_export(sub)
    _add_audit_aggregate(sub)


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="evaluate a run's checkpoint and rewrite its report (also under torchrun: ranks share the work)",
    )
    positional(p, "run", "run directory (train.out_dir)")
    p.add_argument("--split", choices=["test", "val"], default="test", help="which split to report on")
    p.add_argument("--checkpoint", default="best", help="best | last | a checkpoint path")
    tta_option(p, "also report metrics averaged over the 8 dihedral views, with their own operating point")
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
    takes_overrides(p, "train.device=cpu")
    p.set_defaults(func=cmd_evaluate)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="predict P(tumour) for every patch of a folder (Kaggle submission CSV)")
    positional(p, "images", "folder of .tif/.png patches")
    p.add_argument("--checkpoint", required=True, help="a trained patch model (best.pt)")
    p.add_argument("--out", required=True, help="CSV to write: id,label")
    p.add_argument(
        "--ids", default=None, help="CSV with an id column (e.g. sample_submission.csv): predict these, in this order"
    )
    tta_option(p)
    calibration_option(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--threshold", type=float, default=None, help="write 0/1 labels at this threshold")
    group.add_argument(
        "--threshold-from-checkpoint",
        action="store_true",
        help="write 0/1 labels at the checkpoint's validation-chosen operating point",
    )
    device_options(p)
    p.set_defaults(func=cmd_predict)


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="model.ts (TorchScript) and model.pt2 (torch.export) with preprocessing "
        "inside, weights.pt (state dict), model.json",
    )
    p.add_argument("--checkpoint", required=True, help="a trained patch model (best.pt)")
    p.add_argument("--out", required=True, help="folder for model.ts, model.pt2, weights.pt, model.json")
    p.add_argument("--no-calibration", action="store_true", help="leave the fitted temperature out")
    p.set_defaults(func=cmd_export)


def _add_audit_aggregate(sub) -> None:
    p = sub.add_parser("audit", help="leak audit of a run's splits: pixels and slides in more than one split")
    positional(p, "run", "run directory")
    takes_overrides(p, "data.root=/data/pcam")
    p.set_defaults(func=cmd_audit)
    p = sub.add_parser("aggregate", help="one report over runs that differ only in seed and/or fold")
    positional(p, "runs", "run directories", many=True)
    p.add_argument("--out", default=None, help="folder for aggregate.json/.html/.png (default: beside the runs)")
    p.set_defaults(func=cmd_aggregate)
