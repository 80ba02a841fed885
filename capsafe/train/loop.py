"""The Ray Train shell around ``capsafe.train.core``: rank, reporting and restart from the last checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from capsafe.train.config import TrialConfig
from capsafe.train.core import Host, run_training
from capsafe.train.trials import localized


def train_loop_per_worker(config: dict[str, TrialConfig]) -> None:
    """Ray Train entry point; ``config["trial"]`` is the trial's typed config (``capsafe.train.config``)."""
    cfg = localized(config["trial"])  # data files on object storage copied to this node
    import ray.train

    # Ray Train logs every report at INFO from every rank; the driver's progress lines say the same once.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    ctx = ray.train.get_context()

    def report(metrics: dict[str, Any], resume_dir: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(resume_dir)) if resume_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    checkpoint = ray.train.get_checkpoint()
    host = Host(ctx.get_world_rank(), ctx.get_world_size(), report)
    if checkpoint is None:
        run_training(cfg, host)
        return
    # After a worker failure (or a resumed sweep) Ray hands every rank the last reported resume checkpoint.
    with checkpoint.as_directory() as directory:
        host.restore_dir = Path(directory)
        run_training(cfg, host)
