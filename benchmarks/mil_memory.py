"""The largest tensor one slide-level model's evaluation forward makes, per bag size.

    python benchmarks/mil_memory.py [--arch transmil] [--dim 384] N [N ...]

Records every op's output on the CPU (a TorchDispatchMode); prints one line per N.
"""

import argparse
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cancernet.models.mil import build_mil


class Largest(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shape, self.numel = None, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.shape = t.numel(), tuple(t.shape)
        return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tiles", type=int, nargs="+")
    parser.add_argument("--arch", default="transmil")
    parser.add_argument("--dim", type=int, default=384)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_mil(args.arch, args.dim).eval()
    for n in args.tiles:
        bag = torch.randn(1, n, args.dim)
        with torch.no_grad(), Largest() as seen:
            start = time.perf_counter()
            model(bag)
            seconds = time.perf_counter() - start
        mib = seen.numel * 4 / 2**20
        print(f"{args.arch}, {n} tiles: largest tensor {seen.shape} = {mib:.0f} MiB (float32), {seconds:.1f} s")


if __name__ == "__main__":
    main()
