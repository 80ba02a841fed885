"""Generation as both stages use it: the ``Engine`` protocol the evaluation pool's engines follow, sampling
settings, the ``Target`` a request runs on, a model's stop ids, and batched decoding with a transformers model
(``greedy_generate``: training's capability evaluation and the world builder use it in-process).

The engines themselves (vLLM, and transformers behind the same protocol) live in ``capsafe.evaluate.engines``.
"""

from __future__ import annotations

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


FINISH_STOP = "stop"      # the model ended its answer (a stop id), as OpenAI's API and vLLM name it
FINISH_LENGTH = "length"  # ``max_new_tokens`` cut the answer


@dataclass(frozen=True)
class Completion:
    """One generated answer as the engine produced it: its text (special tokens skipped, whitespace stripped),
    the token ids the model generated (the closing stop id excluded; a leading-space token kept, so scoring them
    scores what the model produced, not a re-tokenization of the stripped text), and why decoding ended."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # FINISH_STOP or FINISH_LENGTH


def completion_of(text: str, generated: list[int], stop: list[int], cut_by_length: bool) -> Completion:
    """A ``Completion`` from an engine's raw output: ``generated`` is every id decoded after the prompt (a stop id
    and whatever follows it, padding say, are dropped); ``cut_by_length``: the token budget ended decoding."""
    stops = set(stop)
    cut = next((k for k, i in enumerate(generated) if i in stops), None)
    ids = tuple(generated if cut is None else generated[:cut])
    return Completion(text.strip(), ids, FINISH_LENGTH if cut_by_length else FINISH_STOP)


def texts(completions: list[Completion]) -> list[str]:
    return [c.text for c in completions]


@dataclass(frozen=True)
class Target:
    """What a request runs on: an engine model (multiplexed id) and optionally a LoRA adapter on it."""

    model: str
    adapter: str | None = None


class Engine(Protocol):
    """Generation and scoring for batches of prompts on one base model. Prompts are token ids made by the
    tokenization contract (``capsafe.common.formatting.Encoder``), never text: an engine tokenizes nothing itself.
    Generation stops on the model's stop ids (``capsafe.common.formatting.stop_ids``).

    ``adapter`` names a PEFT LoRA adapter directory to apply (None: the base model itself)."""

    name: str

    def generate(self, prompts: list[list[int]], sampling: Sampling, adapter: str | None = None) -> list[Completion]:
        """One completion per prompt: its text without the prompt and special tokens, the generated ids, and
        whether a stop id or ``max_new_tokens`` ended it."""
        ...

    def generate_many(self, requests: list[Request]) -> list[list[Completion]]:
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
    from capsafe.common.formatting import generation_eos, stop_ids

    return stop_ids(tokenizer, generation_eos(model_dir))


def greedy_generate(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, stop: list[int],
                    batch_size: int = 64, synced_gpus: bool = False) -> list[str]:
    """Batched greedy decoding of prompt ids with a transformers model (left padding), as the capability
    evaluation uses it; stops on ``stop`` ids."""
    return texts(transformers_generate(model, tokenizer, prompts, Sampling(max_new_tokens), stop, batch_size,
                                       synced_gpus))


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


def transformers_generate(model: Any, tokenizer: Any, prompts: list[list[int]], sampling: Sampling, stop: list[int],
              batch_size: int = 64, synced_gpus: bool = False) -> list[Completion]:
    """Decode ``prompts`` with a transformers model (left padding): greedy in batches, or sampled one prompt at a
    time; each answer ends at the first stop id."""
    import torch

    sample = sampling.temperature > 0
    # Sampling decodes one prompt at a time from its own seeded generator: the text then depends on
    # (prompt, seed) only, not on which other prompts shared the batch.
    size = 1 if sample else batch_size
    outputs: list[Completion] = []
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
            text = tokenizer.decode(row[:cut], skip_special_tokens=True)
            # no stop id in the row: decoding ran to the budget (a finished row of a batch is padded after its stop)
            outputs.append(completion_of(text, row, stop, cut_by_length=cut == len(row)))
    return outputs
