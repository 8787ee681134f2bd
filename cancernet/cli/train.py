"""The training commands: `cancernet train --config base [key=value ...]`, what train_ddp.py runs
(single process, or one rank of torchrun: `torchrun --nproc_per_node=4 -m cancernet train ...`),
and `cancernet cv`: repeated k-fold x seeds of one config, then one report over the runs."""

from __future__ import annotations

import logging
from pathlib import Path

from cancernet.cli.options import config_option, takes_overrides

log = logging.getLogger("cancernet")


def cmd_train(args) -> int:
    from cancernet.config import load_config
    from cancernet.runtime.console import setup_logging
    from cancernet.runtime.distributed import session
    from cancernet.train.runner import run

    cfg = load_config(args.config, args.overrides)
    with session(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_min) as dist:
        setup_logging(dist.rank)
        run(cfg, dist)
    return 0


def cmd_cv(args) -> int:
    """Every (seed, fold) run in turn in this process group (each a normal run: a finished one is
    kept, a stopped one resumes), then rank 0 aggregates them."""
    from cancernet.config import load_config
    from cancernet.data.splits import split_seed
    from cancernet.evaluate.aggregate import aggregate
    from cancernet.runtime.console import setup_logging
    from cancernet.runtime.distributed import session
    from cancernet.train.runner import run

    base = load_config(args.config, args.overrides)
    out = Path(args.out or Path("runs") / f"{Path(args.config).stem}-cv")
    runs = [(seed, fold, out / f"fold{fold}-seed{seed}") for seed in args.seeds for fold in range(args.folds)]
    # seeds vary the training, not the data: every run shares one test split and one set of folds
    same_data = f"data.split_seed={split_seed(base)}"
    with session(base.train.device, base.dist.backend, base.dist.timeout_min) as dist:
        setup_logging(dist.rank)
        for i, (seed, fold, run_dir) in enumerate(runs):
            if (run_dir / "report" / "metrics.json").is_file():
                log.info(
                    "cv run %d/%d (seed %d, fold %d): done before, kept (%s)", i + 1, len(runs), seed, fold, run_dir
                )
                continue
            log.info("cv run %d/%d: seed %d, fold %d of %d -> %s", i + 1, len(runs), seed, fold, args.folds, run_dir)
            cv = [
                f"data.folds={args.folds}",
                f"data.fold={fold}",
                f"train.seed={seed}",
                same_data,
                f"train.out_dir={run_dir}",
            ]
            if run(load_config(args.config, [*args.overrides, *cv]), dist) != "done":
                log.warning("cv stopped during run %s; the same command continues it", run_dir)
                return 0
        if dist.is_main:
            from cancernet.cli.evaluate import log_aggregate

            report = out / "aggregate"
            log_aggregate(aggregate([str(r) for _, _, r in runs], report), report)
            log.info("open %s", report / "aggregate.html")
    return 0


def cmd_config(args) -> int:
    from cancernet.config import load_config
    from cancernet.config.describe import describe

    print(describe(load_config(args.config, args.overrides)), end="")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a classifier (DDP under torchrun; checkpoints, resume, the report)",
        description="Train one run of a config: patches, or slides with model.mil (configs/mil.yaml).",
    )
    config_option(p)
    takes_overrides(p, "train.epochs=2")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser(
        "cv",
        help="repeated k-fold x seeds of one config, then one report over the runs (mean, SD, out-of-fold AUC)",
        description="Small-cohort statistics in one command: FOLDS x SEEDS normal runs (OUT/fold<K>-seed<S>), "
        "each resumable, then `aggregate` over them (OUT/aggregate/). Under torchrun every run uses all ranks.",
    )
    config_option(p)
    p.add_argument("--folds", type=int, default=5, help="train+val rotate over this many folds (data.folds)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed of each repeat")
    p.add_argument("--out", default=None, help="folder of the runs and the report (default: runs/<config>-cv)")
    takes_overrides(p, "data.features=feats/")
    p.set_defaults(func=cmd_cv)
    p = sub.add_parser(
        "config",
        help="print every config key with its value and meaning, as YAML a config file can start from",
    )
    p.add_argument("--config", default=None, help="a YAML file or a shipped config's name (default: the defaults)")
    takes_overrides(p, "train.epochs=2")
    p.set_defaults(func=cmd_config)
