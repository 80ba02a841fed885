"""Streaming evaluation (``eval.schedule: streaming``): each finished trial's kept checkpoints are evaluated
through the pool while the sweep goes on training the others.

The pool is started before the sweep and holds its own Ray resources beside training for the whole run
(the run's Ray session is sized for both; see ``capsafe.pipeline``). A trial is queued the moment the
driver has written its rows, with every checkpoint it kept (ladder rungs and target together, so each of
its engines is loaded once for capability and safety). One thread takes whatever is queued and evaluates it
with the same code as the sequential order (``EvalRun.evaluate``); the results are the same keyed
fragments, so ``--resume`` skips what was finished and a driver that dies mid-evaluation loses only the
(checkpoint, suite) pairs still in flight.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from types import TracebackType

from capsafe.evaluate.stage import EvalRun
from capsafe.evaluate.targets import checkpoint_targets

_STOP = object()


class StreamingEvaluation:
    """A queue of trial ids and one thread that evaluates them as they come; ``close()`` waits for the
    queue to drain and raises the first evaluation error, if any."""

    def __init__(self, run: EvalRun, log: Callable[[str], None]) -> None:
        self.run, self.log = run, log
        self.queue: queue.Queue[object] = queue.Queue()
        self.error: BaseException | None = None
        self.evaluated: list[str] = []
        self.cancelled = False
        self.thread = threading.Thread(target=self._work, name="capsafe-streaming-eval", daemon=True)
        self.thread.start()

    def submit(self, trial_id: str) -> None:
        """Queue ``trial_id``'s kept checkpoints ('base': the base model) for evaluation."""
        self.queue.put(trial_id)

    def _take(self) -> tuple[list[str], bool]:
        """Everything queued so far (waiting for at least one item), and whether the queue was closed."""
        items = [self.queue.get()]
        while True:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return [i for i in items if isinstance(i, str)], any(i is _STOP for i in items)

    def _work(self) -> None:
        closed = False
        while not closed:
            trial_ids, closed = self._take()
            if not trial_ids or self.error is not None or self.cancelled:
                continue
            try:
                started = time.perf_counter()
                models = checkpoint_targets(self.run.spec, self.run.paths["model.path"], self.run.results_dir,
                                            set(trial_ids))
                if models:
                    self.run.evaluate(models)
                    self.log(f"evaluate: {', '.join(trial_ids)} evaluated while training goes on "
                             f"({len(models)} model(s), {time.perf_counter() - started:.0f} s)")
                self.evaluated += trial_ids
            except BaseException as exc:  # noqa: BLE001 - kept and raised by close(); the sweep goes on
                self.error = exc
                self.log(f"evaluate: failed on {', '.join(trial_ids)} ({type(exc).__name__}: {str(exc)[:200]}); "
                         "training goes on, the run fails at its end; --resume evaluates what is missing")

    def close(self) -> None:
        """Wait for everything queued to be evaluated; raise the first error."""
        self.queue.put(_STOP)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def __enter__(self) -> StreamingEvaluation:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:  # the sweep failed: finish the batch in hand only, keep the sweep's error
            self.cancelled = True
            self.queue.put(_STOP)
            self.thread.join()
