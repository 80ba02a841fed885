"""The generation ``Engine`` protocol, its sampling settings, and the transformers implementation.

vLLM is the engine of record (``capsafe.vllm_engine``); ``TransformersEngine`` sits behind the same
protocol as a CPU fallback and as the reference that vLLM's output is tested against.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Sampling:
    """How to decode: greedy when ``temperature`` is 0, else sampled with ``seed`` (same seed, same text)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Engine(Protocol):
    """Generation and scoring for batches of prompts on one base model. Prompts are token ids made by the
    tokenization contract (``capsafe.formatting.Encoder``), never text: an engine tokenizes nothing itself.
    Generation stops on the model's stop ids (``capsafe.formatting.stop_ids``).

    ``adapter`` names a PEFT LoRA adapter directory to apply (None: the base model itself)."""

    name: str

    def generate(self, prompts: list[list[int]], sampling: Sampling, adapter: str | None = None) -> list[str]:
        """One completion per prompt, without the prompt and without special tokens."""
        ...

    def generate_many(self, requests: list[Request]) -> list[list[str]]:
        """Several generate calls (prompts, sampling, adapter) answered together, as one batch where the
        engine can: this is how a replica batches requests that arrive while its engine is busy."""
        ...

    def nll(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[float]:
        """Mean negative log-likelihood per token of each continuation after its prompt (nan if empty)."""
        ...

    def close(self) -> None:
        """Release processes and memory; the engine is unusable afterwards."""
        ...


Request = tuple[list[list[int]], Sampling, str | None]


def model_stop_ids(model_dir: str, tokenizer: Any) -> list[int]:
    """The stop ids of a model directory: its tokenizer's and its generation config's."""
    from capsafe.formatting import generation_eos, stop_ids

    return stop_ids(tokenizer, generation_eos(model_dir))


def greedy_generate(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, stop: list[int],
                    batch_size: int = 64, synced_gpus: bool = False) -> list[str]:
    """Batched greedy decoding of prompt ids with a transformers model (left padding), as the capability
    evaluation uses it; stops on ``stop`` ids."""
    return _generate(model, tokenizer, prompts, Sampling(max_new_tokens), stop, batch_size, synced_gpus)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    """(input_ids, attention_mask) tensors of prompt ids padded on the left."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for n, p in enumerate(prompts):
        ids[n, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[n, width - len(p):] = 1
    return ids, mask


def _generate(model: Any, tokenizer: Any, prompts: list[list[int]], sampling: Sampling, stop: list[int],
              batch_size: int = 64, synced_gpus: bool = False) -> list[str]:
    import torch

    sample = sampling.temperature > 0
    # Sampling decodes one prompt at a time from its own seeded generator: the text then depends on
    # (prompt, seed) only, not on which other prompts shared the batch.
    size = 1 if sample else batch_size
    outputs: list[str] = []
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    for start in range(0, len(prompts), size):
        ids, mask = left_pad(prompts[start:start + size], pad)
        extra: dict[str, Any] = {"do_sample": False}
        if sample:
            torch.manual_seed(sampling.seed or 0)
            extra = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=sampling.max_new_tokens, pad_token_id=pad, eos_token_id=stop,
                                 synced_gpus=synced_gpus, **extra)
        for row in out[:, ids.shape[1]:].tolist():
            cut = next((k for k, i in enumerate(row) if i in stop), len(row))
            outputs.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return outputs


class TransformersEngine:
    """transformers ``generate`` in float32 on CPU (or the given device); LoRA adapters through PEFT."""

    name = "transformers"

    def __init__(self, model_dir: str, device: str = "cpu", **_: Any) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.stop = model_stop_ids(model_dir, self.tokenizer)
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
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

    def generate(self, prompts: list[list[int]], sampling: Sampling, adapter: str | None = None) -> list[str]:
        model, ctx = self._model_for(adapter)
        self.seen = [list(p) for p in prompts]
        with ctx:
            return _generate(model, self.tokenizer, prompts, sampling, self.stop)

    def generate_many(self, requests: list[Request]) -> list[list[str]]:
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
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
                logp = torch.log_softmax(logits, dim=-1)
                target = torch.tensor(ids[1:])
                token_lp = logp.gather(1, target[:, None])[:, 0][len(prompt) - 1:]
                scores.append(float(-token_lp.mean()))
        return scores

    def close(self) -> None:
        self.model = self.peft = None


def make_engine(kind: str, model_dir: str, asynchronous: bool = False, **kwargs: Any) -> Any:
    """Build the engine named by the spec (``eval.engine``): an ``Engine``, or with ``asynchronous`` (the pool's
    replicas) vLLM's asynchronous engine, whose ``generate`` and ``nll`` are coroutines."""
    if kind == "vllm":
        from capsafe.vllm_engine import AsyncVLLMEngine, VLLMEngine

        return AsyncVLLMEngine(model_dir, **kwargs) if asynchronous else VLLMEngine(model_dir, **kwargs)
    if kind == "transformers":
        return TransformersEngine(model_dir, **kwargs)
    raise ValueError(f"unknown engine {kind!r}")
