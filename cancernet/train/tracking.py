"""Weights & Biases on rank 0; a no-op tracker elsewhere, when disabled, or when W&B fails.

Training never dies for W&B: every call is guarded, and a failed start falls back to offline
mode, then to the no-op tracker, with one warning. An online start gives up after
wandb.init_timeout seconds (a compute node with an API key but no network would otherwise stall),
and the failed attempt is torn down first so that offline mode can take the same run id.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from cancernet.config import Config
from cancernet.runtime.distributed import DistInfo

log = logging.getLogger(__name__)


class NullTracker:
    run_id: str | None = None

    def log_epoch(self, row: dict) -> None: ...
    def log_images(self, paths: dict[str, Path]) -> None: ...
    def log_model(self, path: Path, metadata: dict) -> None: ...
    def log_summary(self, values: dict) -> None: ...
    def finish(self) -> None: ...


class WandbTracker(NullTracker):
    def __init__(self, run):
        self.run, self.run_id = run, run.id
        run.define_metric("epoch")
        run.define_metric("*", step_metric="epoch")

    def _guard(self, what: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:  # a W&B hiccup must not end a training run
            log.warning("W&B %s failed (%s: %s); training continues", what, type(e).__name__, e)

    def log_epoch(self, row: dict) -> None:
        self._guard("log", self.run.log, dict(row))

    def log_images(self, paths: dict[str, Path]) -> None:
        import wandb

        self._guard(
            "image upload", lambda: self.run.log({f"report/{name}": wandb.Image(str(p)) for name, p in paths.items()})
        )

    def log_model(self, path: Path, metadata: dict) -> None:
        import wandb

        def upload():
            artifact = wandb.Artifact(f"model-{self.run.id}", type="model", metadata=metadata)
            artifact.add_file(str(path))
            self.run.log_artifact(artifact, aliases=["best", "latest"])

        self._guard("model artifact", upload)

    def log_summary(self, values: dict) -> None:
        self._guard("summary", self.run.summary.update, values)

    def finish(self) -> None:
        self._guard("finish", self.run.finish)


def wandb_mode(cfg: Config) -> str:
    """WANDB_MODE in the environment wins over wandb.mode in the config."""
    return os.environ.get("WANDB_MODE", cfg.wandb.mode)


def start_tracker(cfg: Config, dist: DistInfo, run_dir: Path, run_id: str | None) -> NullTracker:
    """The run's tracker; run_id (from a checkpoint) continues the same W&B run after a resume."""
    mode = wandb_mode(cfg)
    if not dist.is_main or mode == "disabled":
        return NullTracker()
    try:
        import wandb
    except Exception as e:
        log.warning("wandb cannot be imported (%s); W&B logging is off", e)
        return NullTracker()
    run_id = run_id or secrets.token_hex(4)  # ours, so a resume can reuse it
    for attempt in dict.fromkeys([mode, "offline"]):  # online first if asked, then offline
        try:
            run = wandb.init(
                project=cfg.wandb.project,
                entity=cfg.wandb.entity,
                name=cfg.wandb.name,
                tags=cfg.wandb.tags,
                config=cfg.to_dict(),
                id=run_id,
                resume="allow",
                dir=os.environ.get("WANDB_DIR", str(run_dir)),
                mode=attempt,
                reinit="create_new",
                settings=wandb.Settings(init_timeout=cfg.wandb.init_timeout, silent=True),
            )
            log.info(
                "W&B run %s (%s)%s",
                run.id,
                attempt,
                "; sync later with `wandb sync " + str(Path(run.dir).parent) + "`" if attempt == "offline" else "",
            )
            return WandbTracker(run)
        except Exception as e:
            log.warning(
                "W&B could not start in %s mode (%s: %s)",
                attempt,
                type(e).__name__,
                str(e).splitlines()[0] if str(e) else "",
            )
            try:  # the failed attempt's service still holds the run id
                wandb.teardown()
            except Exception:
                pass
    log.warning("W&B logging is off for this run")
    return NullTracker()
