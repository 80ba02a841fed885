"""The generation pool: a Ray Serve deployment whose replicas each hold engines (vLLM by default).

Each model (base model or fine-tuned checkpoint) is a multiplexed model id: Serve routes a request to a
replica that already has that model's engine loaded, loads it once otherwise, and evicts the least
recently used engine beyond ``max_models_per_replica``. Engines start once per replica and model, never
per request. The pool is reached through a handle; no HTTP proxy is started.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from capsafe.engines import make_engine


class _LoadedEngine:
    """An engine plus a lock: one generate call at a time per engine (vLLM's LLM is not thread-safe).

    Serve calls ``__del__`` when it evicts the model, which can happen while requests that already hold
    this engine wait for the lock or generate; the engine is then closed by the last of them."""

    def __init__(self, engine: Any) -> None:
        self.engine: Any = engine
        self.lock = asyncio.Lock()
        self.users = 0
        self.evicted = False

    async def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        self.users += 1
        try:
            async with self.lock:
                result: list[str] = await asyncio.to_thread(self.engine.generate, prompts, max_new_tokens)
                return result
        finally:
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


def build_pool(engine_kind: str, engine_kwargs: dict[str, Any], replicas: int, cpus: float, gpus: float,
               max_models: int) -> Any:
    """A bound Serve application for ``serve.run``."""

    @serve.deployment(name="capsafe-generation-pool", max_ongoing_requests=64,
                      logging_config={"log_level": "WARNING"})
    class GenerationPool:
        def __init__(self) -> None:
            self.kind, self.kwargs = engine_kind, engine_kwargs

        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def get_engine(self, model_dir: str) -> _LoadedEngine:
            engine = await asyncio.to_thread(make_engine, self.kind, model_dir, **self.kwargs)
            return _LoadedEngine(engine)

        async def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
            loaded = await self.get_engine(serve.get_multiplexed_model_id())
            return await loaded.generate(prompts, max_new_tokens)

    return GenerationPool.options(  # type: ignore[attr-defined]
        num_replicas=replicas, ray_actor_options={"num_cpus": cpus, "num_gpus": gpus}
    ).bind()


def start_pool(app: Any, name: str) -> Any:
    """Deploy the pool without an HTTP proxy and return its handle."""
    serve.start(proxy_location="Disabled")
    return serve.run(app, name=name, route_prefix=None)


def stop_pool(name: str) -> None:
    serve.delete(name)
