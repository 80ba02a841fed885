"""The generation pool: a Ray Serve deployment whose replicas each hold engines (vLLM by default).

A vLLM replica runs vLLM's asynchronous engine (``AsyncVLLMEngine``): each request's prompts stream into the
engine as they arrive and its scheduler batches everything running (continuous batching). The transformers
engine is synchronous: its requests are merged into batches under a lock (``_LoadedEngine``).

Each engine model (a base model or a fully fine-tuned checkpoint) is a multiplexed model id: Serve routes a
request to a replica that already has that model's engine loaded, loads it once otherwise, and evicts the
least recently used engine beyond ``max_models_per_replica``. LoRA checkpoints are adapters on their base
model's engine, so many trials share one engine. Engines start once per replica and model, never per
request. The pool is reached through a handle; no HTTP proxy is started.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from capsafe.common.generation import Request, Sampling, Target
from capsafe.evaluate.engines import make_engine
from capsafe.evaluate.http_api import HttpContext


class _LoadedEngine:
    """An engine in a replica. A synchronous engine (not thread-safe) gets a lock and a queue: generate calls
    that arrive while it is busy are answered together by its next batch. An asynchronous engine (``async
    def generate``) is called directly: it batches by itself.

    Serve calls ``__del__`` when it evicts the model, which can happen while requests that already hold
    this engine wait for the lock or generate; the engine is then closed by the last of them."""

    def __init__(self, engine: Any) -> None:
        self.engine: Any = engine
        self.lock = asyncio.Lock()
        self.queue: list[tuple[Request, asyncio.Future[list[str]]]] = []
        self.users = 0
        self.evicted = False
        self.native = asyncio.iscoroutinefunction(getattr(engine, "generate", None))

    async def generate(self, request: Request) -> list[str]:
        self.users += 1
        try:
            if self.native:
                result: list[str] = await self.engine.generate(*request)
                return result
            answer: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
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
            self._release()

    async def call(self, method: str, *args: Any) -> Any:
        self.users += 1
        try:
            if self.native:
                return await getattr(self.engine, method)(*args)
            async with self.lock:
                return await asyncio.to_thread(getattr(self.engine, method), *args)
        finally:
            self._release()

    def _release(self) -> None:
        self.users -= 1
        if self.evicted and not self.users:
            self._close()

    def _close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()

    def __del__(self) -> None:
        self.evicted = True
        if not self.users:
            self._close()


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
               max_ongoing_requests: int = 64, http: HttpContext | None = None) -> Any:
    """A bound Serve application for ``serve.run``; with ``http`` it also answers the OpenAI-compatible API
    of ``capsafe.evaluate.http_api`` (``start_pool`` with an HTTP address exposes it)."""

    @serve.deployment(name="capsafe-generation-pool", max_ongoing_requests=max_ongoing_requests,
                      logging_config={"log_level": "WARNING"})
    class GenerationPool:
        def __init__(self) -> None:
            self.kind, self.kwargs = engine_kind, engine_kwargs

        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def get_engine(self, model_dir: str) -> _LoadedEngine:
            engine = await asyncio.to_thread(make_engine, self.kind, model_dir, asynchronous=True, **self.kwargs)
            return _LoadedEngine(engine)

        async def generate(self, prompts: list[list[int]], sampling: dict[str, Any], adapter: str | None) -> list[str]:
            loaded = await self.get_engine(serve.get_multiplexed_model_id())
            return await loaded.generate((prompts, Sampling(**sampling), adapter))

        async def nll(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[float]:
            loaded = await self.get_engine(serve.get_multiplexed_model_id())
            result: list[float] = await loaded.call("nll", prompts, continuations)
            return result

        async def __call__(self, request: Any) -> Any:
            from starlette.responses import JSONResponse

            from capsafe.evaluate.http_api import handle

            async def run(target: Target, prompts: list[list[int]], sampling: Sampling) -> list[str]:
                loaded = await self.get_engine(target.model)
                return await loaded.generate((prompts, sampling, target.adapter))

            if http is None:
                return JSONResponse({"error": {"message": "eval.http is off"}}, status_code=404)
            status, body = await handle(request.method, request.url.path, await request.body(), http, run)
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
