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
    """An engine plus a lock: one generate call at a time per engine (vLLM's LLM is not thread-safe)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.lock = asyncio.Lock()

    def __del__(self) -> None:  # Serve calls this when it evicts the model
        self.engine.close()


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
            async with loaded.lock:
                return await asyncio.to_thread(loaded.engine.generate, prompts, max_new_tokens)

    return GenerationPool.options(  # type: ignore[attr-defined]
        num_replicas=replicas, ray_actor_options={"num_cpus": cpus, "num_gpus": gpus}
    ).bind()


def start_pool(app: Any, name: str) -> Any:
    """Deploy the pool without an HTTP proxy and return its handle."""
    serve.start(proxy_location="Disabled")
    return serve.run(app, name=name, route_prefix=None)


def stop_pool(name: str) -> None:
    serve.delete(name)
