"""The train command: `cancernet train --config base [key=value ...]`, what train_ddp.py runs
(single process, or one rank of torchrun: `torchrun --nproc_per_node=4 -m cancernet train ...`)."""

from __future__ import annotations

from cancernet.cli.options import config_option, takes_overrides


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


def register(sub) -> None:
    p = sub.add_parser("train", help="train a classifier (DDP under torchrun; checkpoints, resume, the report)")
    config_option(p)
    takes_overrides(p, "train.epochs=2")
    p.set_defaults(func=cmd_train)
