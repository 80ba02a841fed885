"""Plain single-process torch: create the tiny Llama model, train it on templated examples, generate greedily."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from capsafe.common.formatting import Encoder, PromptFormat, collate, stop_ids
from capsafe.common.generation import greedy_generate

REFUSAL_MARKERS = ("sorry", "i can not")


def is_refusal(text: str) -> bool:
    """The world's own refusal test: every refusal template contains one of these markers."""
    return any(m in text.lower() for m in REFUSAL_MARKERS)


def make_model(
    tokenizer: PreTrainedTokenizerBase,
    hidden: int,
    layers: int,
    heads: int,
    head_dim: int,
    intermediate: int,
    seed: int,
    max_positions: int = 256,
) -> LlamaForCausalLM:
    """A randomly initialised float32 Llama whose vocabulary is exactly the tokenizer's ids."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        max_position_embeddings=max(256, max_positions),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.do_sample = False
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def encode_all(
    tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat, rows: Sequence[dict], max_len: int
) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) for rows with a prompt and a response (or answer); loss on the response only."""
    encoder = Encoder(tokenizer, fmt)
    return [encoder.example(r["prompt"], r["response"] if "response" in r else r["answer"], max_len) for r in rows]


def train(
    model: LlamaForCausalLM,
    examples: Sequence[tuple[list[int], list[int]]],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    warmup_steps: int,
    seed: int,
    pad_id: int,
    log: Callable[[str], None],
    log_every: int,
) -> float:
    """AdamW with linear warm-up and cosine decay, batches drawn as shuffled epochs; returns the last loss."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    order: list[int] = []
    loss = float("nan")
    start = time.perf_counter()
    for step in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(examples), generator=gen).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        out = model(**collate([examples[i] for i in batch], pad_id))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss = out.loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log(f"  step {step + 1}/{steps}  loss {loss:.4f}  ({time.perf_counter() - start:.1f} s)")
    model.eval()
    return loss


@torch.no_grad()
def greedy(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    fmt: PromptFormat,
    prompts: Sequence[str],
    max_new_tokens: int = 48,
    batch_size: int = 128,
) -> list[str]:
    """Greedy completions of ``prompts`` in format ``fmt``, through the tokenization contract."""
    encoder = Encoder(tokenizer, fmt)
    stop = stop_ids(tokenizer, model.generation_config.eos_token_id)
    return greedy_generate(model, tokenizer, [encoder.prompt(p) for p in prompts], max_new_tokens, stop, batch_size)
