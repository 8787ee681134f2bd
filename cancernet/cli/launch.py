"""`python -m cancernet.cli.launch ARGS`: torchrun (same arguments) that survives a repeated stop signal.

Exit code: torchrun's, or 128 + N after signal N stopped the run (143 for TERM), with one line
instead of a traceback.

torchrun answers TERM by passing it to its workers and waiting up to its shutdown timeout for
them to checkpoint and exit; but a second TERM during that wait raises again inside the wait,
and torchrun exits at once, leaving the workers behind. Under Slurm that second TERM is the
rule, not the exception: preemption signals every process of the job, and srun (or the batch
script's trap) forwards it once more. When torchrun's task ends, Slurm kills what is left of the
step, so the workers die mid-checkpoint. Here torchrun's handler raises once; later signals
are logged and ignored while the workers stop (SIGKILL still ends everything).

Before torchrun spawns anything, a preflight loads the training script's config (`--config CFG
[key=value ...]` after the script) and builds its model once, pretrained weights included: on a
compute node without network, weights missing from the cache would otherwise make every rank
raise, and torchrun restart the group --max-restarts times. A problem is one line and exit 2.
Where fetching is allowed, the launcher (one per node) fills the cache before its ranks read it.
"""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("cancernet.cli.launch")


def install_once_handler() -> bool:
    """Make torchrun's termination handler fire once; False if this torch has no such handler."""
    from torch.distributed.elastic.multiprocessing import api

    first = getattr(api, "_terminate_process_handler", None)
    if first is None:
        return False
    fired = []

    def once(signum, frame):
        if fired:
            log.warning("signal %d ignored: the workers are already stopping", signum)
            return
        fired.append(signum)
        first(signum, frame)

    api._terminate_process_handler = once  # looked up when torchrun registers its handlers
    return True


def preflight(argv: list[str]) -> str | None:
    """The training run's config and model weights, checked once: None when they are fine, else
    the problem. argv: torchrun's arguments; the config follows the script (the first *.py)."""
    from cancernet.config import SLIDE, load_config, task_kind
    from cancernet.models.classifier import build_model, resolve_preprocessing
    from cancernet.runtime.errors import UserError

    script = next((i for i, arg in enumerate(argv) if arg.endswith(".py")), None)
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*")
    args, _ = parser.parse_known_args(argv[script + 1 :] if script is not None else [])
    if not args.config:
        return None  # not a training script of ours: nothing to check
    try:
        cfg = load_config(args.config, args.overrides)
        if task_kind(cfg) == SLIDE:  # a slide-level run reads stored features: check them instead of weights
            from cancernet.data.bags import slide_table

            slide_table(cfg.data)
            return None
        cfg, _ = resolve_preprocessing(cfg)
        build_model(cfg.model, cfg.data.image_size)
    except UserError as e:
        return str(e)
    return None


def main() -> int:
    """torchrun's exit code; 128 + N when signal N stopped it (after its workers had stopped);
    2 when the preflight finds a problem (nothing started)."""
    problem = preflight(sys.argv[1:])
    if problem is not None:
        print(f"cancernet.cli.launch: {problem}", file=sys.stderr, flush=True)
        return 2
    if not install_once_handler():
        log.warning("this torch has no torchrun termination handler to guard; running plain torchrun")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    sys.argv[0] = "torchrun"
    try:
        torchrun()
    except SignalException as e:
        print(
            f"cancernet.cli.launch: stopped by signal {int(e.sigval)} ({e.sigval.name}); the workers were asked "
            "to checkpoint and stop first",
            file=sys.stderr,
            flush=True,
        )
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
