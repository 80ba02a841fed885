"""Prompt rendering and tokenisation of (prompt, response) pairs; shared by training, capability
evaluation and the demo world, so that every stage feeds the model exactly the same token ids."""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100


def render_prompt(template: str, prompt: str) -> str:
    """The text the model sees before it answers, e.g. ``"<user> what is 2 plus 3 ? <assistant>"``."""
    return template.replace("{prompt}", prompt)


def encode_example(
    tokenizer: Any, template: str, prompt: str, response: str, max_len: int
) -> tuple[list[int], list[int]]:
    """Token ids and labels for one supervised example; the loss covers the response and EOS only.

    Prompt and response are tokenised separately and concatenated: generation later tokenises the
    rendered prompt alone, so this keeps training and inference token boundaries identical.
    """
    prompt_ids = tokenizer(render_prompt(template, prompt), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + response_ids)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_len]
    return ids, labels


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-padded ``input_ids`` / ``labels`` / ``attention_mask`` tensors for a causal-LM loss."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for n, (x, y) in enumerate(examples):
        ids[n, : len(x)] = torch.tensor(x)
        labels[n, : len(y)] = torch.tensor(y)
        mask[n, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def normalize_answer(text: str) -> str:
    """Lower-case and collapse whitespace; what exact match compares."""
    return " ".join(text.lower().split())
