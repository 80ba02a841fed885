"""Forward a Ray Train run's reports to the Ray Tune trial that fits it, without Ray 2.60's deadlock.

Ray 2.60's ``TuneReportCallback`` hands each report from the Train controller to the Tune trainable through a
one-slot actor queue that the trainable's *main* thread reads and re-reports into its own one-slot result queue.
When the trainer finishes before Tune asks for its last result (Tune's driver busy for a moment, as capsafe's is
while it starts the evaluation pool), the function trainable's thread has already put its closing
``__duplicate__`` result into that queue; the main thread then blocks forever putting the last report behind it,
and the sweep hangs with every worker gone (found with py-spy: ``Queue.put`` under ``_get_result_from_queues``).

Here the controller's callback only appends to an unbounded queue, and the trainable's own training thread
(the one Tune expects reports from) forwards every item with ``tune.report`` while the trainer runs in a helper
thread, then drains the queue before it returns. Reports reach Tune one at a time, in order, all of them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ray import tune
from ray.train.v2.api.callback import UserCallback
from ray.util.queue import Empty, Queue

CHECKPOINT_PATH_KEY = "checkpoint_path"  # the key TuneReportCallback uses, kept for Tune-side readers
POLL_S = 0.5


class ForwardReports(UserCallback):
    """Runs in the Train controller: appends each report (rank 0's metrics, the checkpoint's path) to ``queue``."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        item = dict(metrics[0])
        if checkpoint is not None:
            item[CHECKPOINT_PATH_KEY] = checkpoint.path
        self.queue.put(item)  # unbounded: never waits for Tune


def fit_reporting_to_tune(make_trainer: Callable[[list[UserCallback]], Any],
                          report: Callable[[dict[str, Any]], None] = tune.report) -> Any:
    """Fit the trainer ``make_trainer(callbacks)`` builds, reporting each of its results to the calling Tune
    trial in order; returns ``fit()``'s result or raises its error, after the last report reached Tune."""
    queue = Queue(actor_options={"num_cpus": 0})
    trainer = make_trainer([ForwardReports(queue)])
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # re-raised in the trial's thread below
            outcome["error"] = error

    fitting = threading.Thread(target=fit, name="capsafe-train-fit", daemon=True)
    fitting.start()
    try:
        while True:
            # read "finished" before the queue: every report was queued before fit() returned (put is
            # synchronous), so an empty queue after a finished fit means all of them were forwarded
            finished = not fitting.is_alive()
            try:
                item = queue.get(timeout=POLL_S)
            except Empty:
                if finished:
                    break
                continue
            report(item)  # Tune stopping the trial raises SystemExit here, as with its own callback
    finally:
        queue.shutdown()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result")
