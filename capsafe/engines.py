"""The generation ``Engine`` protocol and its transformers implementation.

vLLM is the engine of record (``capsafe.vllm_engine``); ``TransformersEngine`` sits behind the same
protocol as a CPU fallback and as the reference that vLLM's greedy output is tested against.
"""

from __future__ import annotations

from typing import Any, Protocol


class Engine(Protocol):
    """Greedy text generation for a batch of already-rendered prompts."""

    name: str

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """One completion per prompt, without the prompt and without special tokens."""
        ...

    def close(self) -> None:
        """Release processes and memory; the engine is unusable afterwards."""
        ...


def greedy_generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                    batch_size: int = 64, synced_gpus: bool = False) -> list[str]:
    """Batched greedy decoding with a transformers model (left padding), as the capability eval uses it."""
    import torch

    tokenizer.padding_side = "left"
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        device = next(model.parameters()).device
        with torch.no_grad():
            out = model.generate(
                input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, synced_gpus=synced_gpus,
            )
        new_tokens = out[:, enc["input_ids"].shape[1]:]
        outputs.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return outputs


class TransformersEngine:
    """transformers ``generate`` in float32 on CPU (or the given device)."""

    name = "transformers"

    def __init__(self, model_dir: str, device: str = "cpu", **_: Any) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model = model.to(device).eval()

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        return greedy_generate(self.model, self.tokenizer, prompts, max_new_tokens)

    def close(self) -> None:
        self.model = None


def make_engine(kind: str, model_dir: str, **kwargs: Any) -> Engine:
    """Build the engine named by the spec (``eval.engine``)."""
    if kind == "vllm":
        from capsafe.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, **kwargs)
    if kind == "transformers":
        return TransformersEngine(model_dir, **kwargs)
    raise ValueError(f"unknown engine {kind!r}")
