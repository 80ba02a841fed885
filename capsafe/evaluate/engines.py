"""The generation engines behind ``capsafe.common.generation.Engine``, and the factory the spec's
``eval.engine`` names: vLLM is the engine of record (``capsafe.evaluate.vllm_engine``, imported only when asked
for); ``TransformersEngine`` sits behind the same protocol as a CPU fallback and as the reference that vLLM's
output is tested against."""

from __future__ import annotations

import math
from typing import Any

from capsafe.common.generation import Completion, Request, Sampling, model_stop_ids, transformers_generate


class TransformersEngine:
    """transformers ``generate`` in float32 on CPU, or the given device and torch dtype (a GPU: bfloat16); LoRA
    adapters through PEFT."""

    name = "transformers"

    def __init__(self, model_dir: str, device: str = "cpu", dtype: Any = None, **_: Any) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.stop = model_stop_ids(model_dir, self.tokenizer)
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or torch.float32)
        self.model = model.to(device).eval()
        self.peft: Any = None
        self.adapters: dict[str, str] = {}
        self.seen: list[list[int]] = []  # the prompt ids of the last generate call, for checks

    def _model_for(self, adapter: str | None) -> tuple[Any, Any]:
        """The model to run and a context manager (base requests switch loaded adapters off)."""
        import contextlib

        if adapter is None:
            return self.model, (self.peft.disable_adapter() if self.peft is not None else contextlib.nullcontext())
        if adapter not in self.adapters:
            name = f"a{len(self.adapters)}"
            if self.peft is None:
                from peft import PeftModel

                self.peft = PeftModel.from_pretrained(self.model, adapter, adapter_name=name).eval()
            else:
                self.peft.load_adapter(adapter, adapter_name=name)
            self.adapters[adapter] = name
        self.peft.set_adapter(self.adapters[adapter])
        return self.peft, contextlib.nullcontext()

    def generate(self, prompts: list[list[int]], sampling: Sampling, adapter: str | None = None) -> list[Completion]:
        model, ctx = self._model_for(adapter)
        self.seen = [list(p) for p in prompts]
        with ctx:
            return transformers_generate(model, self.tokenizer, prompts, sampling, self.stop)

    def generate_many(self, requests: list[Request]) -> list[list[Completion]]:
        return [self.generate(*r) for r in requests]

    def nll(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[float]:
        import torch

        model, ctx = self._model_for(None)
        scores = []
        self.seen = [list(p) for p in prompts]
        with ctx, torch.no_grad():
            for prompt, cont in zip(prompts, continuations, strict=True):
                if not prompt or not cont:
                    scores.append(math.nan)
                    continue
                ids = list(prompt) + list(cont)
                logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0, :-1].float()
                logp = torch.log_softmax(logits, dim=-1)
                target = torch.tensor(ids[1:], device=logp.device)
                token_lp = logp.gather(1, target[:, None])[:, 0][len(prompt) - 1:]
                scores.append(float(-token_lp.mean()))
        return scores

    def close(self) -> None:
        self.model = self.peft = None


def make_engine(kind: str, model_dir: str, asynchronous: bool = False, **kwargs: Any) -> Any:
    """Build the engine named by the spec (``eval.engine``): an ``Engine``, or with ``asynchronous`` (the pool's
    replicas) vLLM's asynchronous engine, whose ``generate`` and ``nll`` are coroutines."""
    if kind == "vllm":
        from capsafe.evaluate.vllm_engine import AsyncVLLMEngine, VLLMEngine

        return AsyncVLLMEngine(model_dir, **kwargs) if asynchronous else VLLMEngine(model_dir, **kwargs)
    if kind == "transformers":
        return TransformersEngine(model_dir, **kwargs)
    raise ValueError(f"unknown engine {kind!r}")
