"""vLLM behind the ``Engine`` protocol. The only module that imports vllm."""

from __future__ import annotations

import contextlib
import gc
import os
from typing import Any


class VLLMEngine:
    """One ``vllm.LLM`` (started once; 20-60 s on CPU), greedy sampling.

    On CPU the engine needs float32, eager mode and an explicit KV-cache size; on GPU the defaults apply.
    """

    name = "vllm"

    def __init__(self, model_dir: str, max_model_len: int = 256, seed: int = 0, **_: Any) -> None:
        import torch

        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            # Several replicas share a small machine: let the OS place threads instead of pinning all to core 0.
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        from vllm import LLM

        kwargs: dict[str, Any] = {"model": model_dir, "max_model_len": max_model_len, "seed": seed}
        if not on_gpu:
            kwargs.update(dtype="float32", enforce_eager=True, max_num_seqs=64)
        self.llm: Any = LLM(**kwargs)

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, skip_special_tokens=True)
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outs]

    def close(self) -> None:
        if self.llm is None:
            return
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None
        gc.collect()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
