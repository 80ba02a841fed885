"""The generation pool: a Ray Serve deployment whose replicas each hold engines (vLLM by default).

A vLLM replica runs vLLM's asynchronous engine (``AsyncVLLMEngine``): each request's prompts stream into the
engine as they arrive and its scheduler batches everything running (continuous batching). The transformers
engine is synchronous: its requests are merged into batches under a lock (``_LoadedEngine``).

Each engine model (a base model or a fully fine-tuned checkpoint) is a multiplexed model id: Serve routes a
request to a replica that already has that model loaded, loads it once otherwise, and evicts the least recently
used model beyond ``max_models_per_replica``. Engines outlive the models they serve: an evicted engine stays
resident, and the next checkpoint of the same shape is swapped into it (``capsafe.evaluate.resident``: weights
loaded in place, the first swap of each shape checked against a fresh engine) instead of starting an engine.
LoRA checkpoints are adapters on their base model's engine, so many trials share one engine. The pool is
reached through a handle; no HTTP proxy is started.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from capsafe.common.generation import Completion, Request, Sampling, Target
from capsafe.common.storage import localize
from capsafe.evaluate.engines import make_engine
from capsafe.evaluate.http_api import HttpContext
from capsafe.evaluate.resident import EngineShelf, Verdicts


class _LoadedEngine:
    """A model as Serve's multiplexing holds it: a lease on a resident engine of the replica's shelf. A
    synchronous engine (not thread-safe) gets a lock and a queue: generate calls that arrive while it is busy
    are answered together by its next batch. An asynchronous engine (``async def generate``) is called
    directly: it batches by itself.

    Serve calls ``__del__`` when it evicts the model, which can happen while requests that already hold this
    engine wait for the lock or generate; the shelf keeps the engine until the last of them is done, then
    may swap another checkpoint into it."""

    def __init__(self, shelf: EngineShelf, resident: Any) -> None:
        self.shelf, self.resident = shelf, resident
        self.engine: Any = resident.engine
        self.lock = asyncio.Lock()
        self.queue: list[tuple[Request, asyncio.Future[list[Completion]]]] = []
        self.retired = False
        self.native = asyncio.iscoroutinefunction(getattr(self.engine, "generate", None))

    async def generate(self, request: Request) -> list[Completion]:
        self.shelf.enter(self.resident)
        try:
            if self.native:
                result: list[Completion] = await self.engine.generate(*request)
                return result
            answer: asyncio.Future[list[Completion]] = asyncio.get_running_loop().create_future()
            self.queue.append((request, answer))
            async with self.lock:
                if not answer.done():  # nobody took it yet: answer everything queued so far in one batch
                    batch, self.queue = self.queue, []
                    try:
                        results = await asyncio.to_thread(self.engine.generate_many, [r for r, _ in batch])
                    except Exception as exc:
                        for _, fut in batch:
                            fut.set_exception(exc)
                    else:
                        for (_, fut), result in zip(batch, results, strict=True):
                            fut.set_result(result)
            return await answer
        finally:
            self.shelf.leave(self.resident)

    async def call(self, method: str, *args: Any) -> Any:
        self.shelf.enter(self.resident)
        try:
            if self.native:
                return await getattr(self.engine, method)(*args)
            async with self.lock:
                return await asyncio.to_thread(getattr(self.engine, method), *args)
        finally:
            self.shelf.leave(self.resident)

    def __del__(self) -> None:
        # once: Serve calls it on eviction and the garbage collector again later, when the engine may already
        # serve another checkpoint under another lease
        if not self.retired:
            self.retired = True
            self.shelf.retire(self.resident)


def deployment_options(replicas: int, cpus: float, gpus: float,
                       autoscaling: dict[str, Any] | None = None) -> dict[str, Any]:
    """Serve options of the pool: a fixed replica count, or autoscaling bounds when given."""
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus}}
    if autoscaling:
        options["autoscaling_config"] = dict(autoscaling)
    else:
        options["num_replicas"] = replicas
    return options


def build_pool(engine_kind: str, engine_kwargs: dict[str, Any], options: dict[str, Any], max_models: int,
               max_ongoing_requests: int = 64, http: HttpContext | None = None, swap_weights: bool = True,
               checks_dir: str | None = None, spare_engines: int = 0) -> Any:
    """A bound Serve application for ``serve.run``; with ``http`` it also answers the OpenAI-compatible API
    of ``capsafe.evaluate.http_api`` (``start_pool`` with an HTTP address exposes it). ``swap_weights`` lets
    replicas swap checkpoints into resident engines; ``checks_dir`` is where they share their swap checks
    (a folder of the run); ``spare_engines`` engines beyond ``max_models`` stay resident after eviction."""

    @serve.deployment(name="capsafe-generation-pool", max_ongoing_requests=max_ongoing_requests,
                      logging_config={"log_level": "WARNING"})
    class GenerationPool:
        def __init__(self) -> None:
            import logging

            self.kind, self.kwargs = engine_kind, engine_kwargs
            logger = logging.getLogger("ray.serve")
            # warnings reach the driver's log (the deployment logs at WARNING); a swap's outcome is worth a line
            self.shelf = EngineShelf(self._start, logger.warning, max_models + spare_engines, Verdicts(checks_dir),
                                     swap_weights)

        async def _start(self, model_dir: str) -> Any:
            return await asyncio.to_thread(make_engine, self.kind, model_dir, asynchronous=True, **self.kwargs)

        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def get_engine(self, model_dir: str) -> _LoadedEngine:
            # a checkpoint on object storage is copied to this node first (once: a later call finds it whole)
            local = await asyncio.to_thread(localize, model_dir)
            return _LoadedEngine(self.shelf, await self.shelf.acquire(local))

        async def engine_stats(self) -> dict[str, Any]:
            """Engines started and checkpoints swapped in by this replica (for tests and benchmarks)."""
            return {"starts": self.shelf.starts, "swaps": self.shelf.swaps, "reuses": self.shelf.reuses,
                    "resident": len(self.shelf.residents)}

        def __del__(self) -> None:
            self.shelf.close()

        async def generate(self, prompts: list[list[int]], sampling: dict[str, Any],
                           adapter: str | None) -> list[Completion]:
            loaded = await self.get_engine(serve.get_multiplexed_model_id())
            if adapter is not None:
                adapter = await asyncio.to_thread(localize, adapter)
            return await loaded.generate((prompts, Sampling(**sampling), adapter))

        async def nll(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[float]:
            loaded = await self.get_engine(serve.get_multiplexed_model_id())
            result: list[float] = await loaded.call("nll", prompts, continuations)
            return result

        async def __call__(self, request: Any) -> Any:
            from starlette.responses import JSONResponse

            from capsafe.evaluate.http_api import handle

            async def run(target: Target, prompts: list[list[int]], sampling: Sampling) -> list[Completion]:
                loaded = await self.get_engine(target.model)
                adapter = None if target.adapter is None else await asyncio.to_thread(localize, target.adapter)
                return await loaded.generate((prompts, sampling, adapter))

            if http is None:
                return JSONResponse({"error": {"message": "eval.http is off"}}, status_code=404)
            status, body = await handle(request.method, request.url.path, await request.body(), http, run,
                                        request.headers.get("authorization"))
            return JSONResponse(body, status_code=status)

    return GenerationPool.options(**options).bind()  # type: ignore[attr-defined]


def start_pool(app: Any, name: str, http: tuple[str, int] | None = None) -> Any:
    """Deploy the pool and return its handle; without ``http`` (host, port) no HTTP proxy is started."""
    if http is None:
        serve.start(proxy_location="Disabled")
        return serve.run(app, name=name, route_prefix=None)
    serve.start(proxy_location="HeadOnly", http_options={"host": http[0], "port": http[1]})
    return serve.run(app, name=name, route_prefix="/")


def stop_pool(name: str) -> None:
    serve.delete(name)
