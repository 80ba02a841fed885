"""The driver's side of the generation pool: Serve handle calls as futures, retried when a replica dies.

Requests run on a thread pool so that ``capsafe.evaluate.fan_out`` can wait for whichever answers first; a request
that hits a dead replica is sent again (Serve has started a replacement, or routes to a live one), so a
killed replica costs time, never rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from capsafe.common.generation import Completion, Sampling, Target


def retryable_errors() -> tuple[type[BaseException], ...]:
    """What a dead or restarting replica raises in the caller."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    return (RayActorError, ActorUnavailableError)


def call_with_retries(call: Callable[[], Any], retries: int, retry_on: tuple[type[BaseException], ...],
                      on_retry: Callable[[int, BaseException], None], backoff_s: float = 1.0) -> Any:
    """``call()``, again up to ``retries`` times while it raises one of ``retry_on``."""
    for attempt in range(retries + 1):
        try:
            return call()
        except retry_on as exc:
            if attempt == retries:
                raise
            on_retry(attempt + 1, exc)
            time.sleep(min(backoff_s * 2 ** attempt, 15.0))
    raise AssertionError("unreachable")


class PoolClient:
    """``capsafe.evaluate.panel.Pool`` over a Serve handle of ``capsafe.evaluate.serve_pool``'s deployment."""

    def __init__(self, handle: Any, retries: int, log: Callable[[str], None], concurrency: int = 32,
                 retry_on: tuple[type[BaseException], ...] | None = None, backoff_s: float = 1.0) -> None:
        self.handle, self.retries, self.log, self.backoff_s = handle, retries, log, backoff_s
        self.retry_on = retry_on if retry_on is not None else retryable_errors()
        self.executor = ThreadPoolExecutor(concurrency, thread_name_prefix="capsafe-pool")
        self.retried = 0

    def generate(self, target: Target, prompts: list[list[int]], sampling: Sampling) -> Future[list[Completion]]:
        return self.executor.submit(self._call, "generate", target.model, prompts, sampling.as_dict(),
                                    target.adapter)

    def nll(self, model: str, prompts: list[list[int]], continuations: list[list[int]]) -> Future[list[float]]:
        return self.executor.submit(self._call, "nll", model, prompts, continuations)

    def _call(self, method: str, model: str, *args: Any) -> Any:
        def once() -> Any:
            return getattr(self.handle.options(multiplexed_model_id=model), method).remote(*args).result()

        def note(attempt: int, exc: BaseException) -> None:
            self.retried += 1
            self.log(f"pool: a {method} request for {model} failed ({type(exc).__name__}: {str(exc)[:120]}); "
                     f"retry {attempt}/{self.retries}")

        return call_with_retries(once, self.retries, self.retry_on, note, self.backoff_s)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
