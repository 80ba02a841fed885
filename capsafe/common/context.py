"""Context lengths from the models and the data, checked before anything trains.

Nothing here guesses a context: ``train.max_seq_len`` defaults to the longest training example the run will
see, ``eval.max_model_len`` to the longest prompt the pool will be sent plus what it may generate, and both stay
within the model's own ``max_position_embeddings``. Every suite prompt (rendered as each method shows it) and the
capability prompts are checked against the engines' context up front: items that do not fit are named in an
error before any trial starts, instead of failing requests after the sweep has trained. Judge inputs depend on
responses not yet generated; their bound is checked here and an input that still does not fit is labelled
``too_long`` by its judge rather than sent.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsafe.common.formatting import Encoder, PromptFormat
from capsafe.errors import SpecError

# A model whose config names no context at all (rare) is assumed to take this many positions.
UNKNOWN_CONTEXT = 2048


def model_context(model: str | Path) -> int:
    """``max_position_embeddings`` (or its older names) of a model directory or Hugging Face id; a PEFT adapter
    directory is read through its base model."""
    path = Path(model)
    if (path / "adapter_config.json").is_file():
        return model_context(json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"])
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(model)).to_dict()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int):
            return int(config[key])
    return UNKNOWN_CONTEXT


@dataclass(frozen=True)
class Prompted:
    """One prompt the pool will be sent: where it comes from, its ids' length and what it may generate."""

    where: str
    tokens: int
    new_tokens: int

    @property
    def needs(self) -> int:
        return self.tokens + self.new_tokens


def eval_context(prompts: Iterable[Prompted], model_ctx: int, wanted: int | None) -> int:
    """The engines' context: ``wanted`` if the spec sets it, else the longest need, never beyond the model's.
    Raises SpecError naming every prompt that does not fit."""
    items = list(prompts)
    longest = max((p.needs for p in items), default=1)
    limit = min(wanted, model_ctx) if wanted is not None else model_ctx
    over = [p for p in items if p.needs > limit]
    if over:
        shown = "; ".join(f"{p.where}: {p.tokens} prompt + {p.new_tokens} new tokens" for p in over[:8])
        more = f" and {len(over) - 8} more" if len(over) > 8 else ""
        raise SpecError(
            f"{len(over)} evaluation prompt(s) do not fit the context of {limit} tokens (eval.max_model_len "
            f"{wanted if wanted is not None else 'unset'}, the model's {model_ctx}): {shown}{more}. Raise "
            "eval.max_model_len (up to the model's context), lower eval.max_new_tokens / task.max_new_tokens, or "
            "drop those items (eval.max_prompts_per_suite, a shorter suite file).")
    return limit if wanted is not None else longest


def suite_prompts(suites: Iterable[Any], encoders: dict[str, Encoder], new_tokens: int) -> list[Prompted]:
    """Every suite item as each distinct evaluation format renders it (methods may show suites their own way)."""
    out = []
    for name, encoder in encoders.items():
        for suite in suites:
            for item in suite.items:
                out.append(Prompted(f"suite '{suite.name}' item {item['id']} ({name})",
                                    len(encoder.prompt(item["prompt"])), new_tokens))
    return out


def capability_prompts(items: list[dict[str, str]], encoders: dict[str, Encoder], new_tokens: int) -> list[Prompted]:
    """Every held-out capability item as each method's training format renders it."""
    return [Prompted(f"capability item {n} ({name})", len(encoder.prompt(it["prompt"])), new_tokens)
            for name, encoder in encoders.items() for n, it in enumerate(items)]


def judge_context(judge_name: str, overhead: int, response_tokens: int, new_tokens: int, judge_ctx: int,
                  wanted: int | None) -> int:
    """A judge's context need: its prompt around an empty response, the longest response the evaluated models
    may write (counted in their tokens; a judge tokenizer that spends more on them gets its input labelled
    ``too_long``), and its own output. Raises SpecError when even that cannot fit."""
    needs = overhead + response_tokens + new_tokens
    limit = min(wanted, judge_ctx) if wanted is not None else judge_ctx
    if needs > limit:
        raise SpecError(f"LLM judge '{judge_name}' needs about {needs} tokens ({overhead} of prompt, "
                        f"{response_tokens} of response, {new_tokens} to answer) but its context is {limit}; lower "
                        f"eval.max_new_tokens or the judge's max_new_tokens, or raise eval.max_model_len.")
    return needs


def train_seq_len(examples: Iterable[tuple[str, int]], model_ctx: int, wanted: int | None,
                  log: Callable[[str], None]) -> int:
    """``train.max_seq_len``: ``wanted`` if set, else the longest example; never beyond the model's context.
    Logs how many examples are truncated (their end of turn is then cut off), and the longest of them."""
    lengths = list(examples)
    longest = max((n for _, n in lengths), default=1)
    limit = min(wanted if wanted is not None else longest, model_ctx)
    cut = [(where, n) for where, n in lengths if n > limit]
    if cut:
        worst = max(cut, key=lambda c: c[1])
        log(f"context: {len(cut)} of {len(lengths)} training examples are longer than {limit} tokens and are "
            f"truncated, losing their end-of-turn token (longest: {worst[0]}, {worst[1]} tokens); raise "
            f"train.max_seq_len (up to the model's context of {model_ctx}) to keep them whole")
    return limit


def encoders_for(tokenizer: Any, formats: Iterable[PromptFormat]) -> dict[str, Encoder]:
    """One encoder per distinct format, named by the format (for messages)."""
    out: dict[str, Encoder] = {}
    for fmt in formats:
        key = f"chat template{', system prompt' if fmt.system_prompt else ''}" if fmt.chat_template else \
            f"template {fmt.template!r}{', system prompt' if fmt.system_prompt else ''}"
        while key in out and out[key].fmt != fmt:
            key += "'"
        out[key] = Encoder(tokenizer, fmt)
    return out
