"""Train a cancer-patch classifier: `python train_ddp.py --config CFG [key=value ...]`.

Single process without a launcher; DDP under `torchrun --nproc_per_node=N train_ddp.py ...`.
The same as `cancernet train` (cancernet/cli/train.py).
"""

import sys

from cancernet.cli import main
from cancernet.runtime.console import main_guard

if __name__ == "__main__":  # loader workers re-run this script's top level: they must not train
    sys.exit(main_guard(lambda: main(["train", *sys.argv[1:]])))
