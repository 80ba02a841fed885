"""Ray Tune's W&B logger, with each trial's W&B run on disk before its logging actor is stopped.

Ray's ``WandbLoggerCallback`` logs each trial from an actor (``_WandbLoggingActor``) and kills that actor the
moment its ``run()`` returns: on the next trial end, or at once in ``on_experiment_end``. ``run()`` ends with
``wandb.finish()``, which in wandb 0.31 only *publishes* the finish message to the wandb-core service and
returns; the service writes the run file's buffered records when it handles that message. Killing the actor
kills the service with it (Ray ends an actor's child processes), so a run whose actor was killed within those
milliseconds kept only what had been flushed before: one history record, or none, of a curve that had many.
``wandb.teardown()`` waits until the service has closed every run and exited.
"""

from __future__ import annotations

from ray.air.integrations.wandb import WandbLoggerCallback, _WandbLoggingActor


class FlushedWandbLoggingActor(_WandbLoggingActor):
    """Ray's W&B logging actor whose ``run()`` returns only once wandb-core has written the whole run."""

    def run(self) -> None:
        super().run()
        self._wandb.teardown()


class WandbTracker(WandbLoggerCallback):
    """``WandbLoggerCallback`` (same arguments) with the flushed logging actor."""

    _logger_actor_cls = FlushedWandbLoggingActor
