"""Tools: bench (throughput, JSON lines) and fetch-weights (pretrained weights into their cache)."""

from __future__ import annotations

import logging

from cancernet.cli.options import config_option, takes_overrides

log = logging.getLogger("cancernet")


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
    elif args.what == "launch":
        results = [bench.bench_launch(cfg, args.steps)]
    elif args.what == "slide":
        if not args.slide:
            raise UserError("bench slide needs --slide PATH")
        results = [bench.bench_slide(cfg, args.slide)]
    else:
        results = bench.bench_train(cfg, args.steps)
    for result in results:
        print(json.dumps(result), flush=True)
    return 0


def cmd_fetch_weights(args) -> int:
    from cancernet.models.classifier import fetch_weights

    for arch in args.arch:
        log.info("%s", fetch_weights(arch, args.mirror))
    return 0


def register(sub) -> None:
    _add_bench(sub)
    _add_fetch_weights(sub)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="throughput: data path, train step ceiling, real loop (JSON lines)")
    p.add_argument(
        "what",
        choices=["data", "step", "train", "slide", "ops", "launch"],
        help="data: loaders; step: the train step's ceiling; train: the real loop; slide: predict-slide; "
        "ops: kernels per step; launch: is the step launch-bound",
    )
    config_option(p)
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
    takes_overrides(p, "train.batch_size=128")
    p.set_defaults(func=cmd_bench)


def _add_fetch_weights(sub) -> None:
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
