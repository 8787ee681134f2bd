"""Train a cancer-patch classifier: `python train_ddp.py --config CFG [key=value ...]`.

Single process without a launcher; DDP under `torchrun --nproc_per_node=N train_ddp.py ...`.
"""

import argparse
import sys

from cancernet.config import load_config
from cancernet.runtime.console import main_guard, setup_logging
from cancernet.runtime.distributed import session
from cancernet.train.runner import run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=2")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    with session(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_min) as dist:
        setup_logging(dist.rank)
        run(cfg, dist)
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
