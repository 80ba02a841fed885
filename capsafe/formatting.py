"""Prompt rendering and tokenisation of (prompt, response) pairs; shared by training, capability
evaluation and the demo world, so that every stage feeds the model exactly the same token ids."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

IGNORE_INDEX = -100


def render_prompt(template: str, prompt: str) -> str:
    """The text the model sees before it answers, e.g. ``"<user> what is 2 plus 3 ? <assistant>"``."""
    return template.replace("{prompt}", prompt)


@dataclass(frozen=True)
class PromptFormat:
    """How a request becomes model input: a text template, optionally inside the tokenizer's chat template."""

    template: str = "{prompt}"
    chat_template: bool = False
    system_prompt: str | None = None

    def render(self, prompt: str, tokenizer: Any = None) -> str:
        text = render_prompt(self.template, prompt)
        if not self.chat_template:
            if self.system_prompt:
                return f"{self.system_prompt}\n\n{text}"
            return text
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("model.chat_template is true but the tokenizer has no chat template; set "
                             "model.chat_template=false and give model.prompt_template instead.")
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": text})
        rendered: str = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return rendered

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def encode_example(
    tokenizer: Any, template: str | PromptFormat, prompt: str, response: str, max_len: int
) -> tuple[list[int], list[int]]:
    """Token ids and labels for one supervised example; the loss covers the response and EOS only.

    Prompt and response are tokenised separately and concatenated: generation later tokenises the
    rendered prompt alone, so this keeps training and inference token boundaries identical.
    """
    fmt = template if isinstance(template, PromptFormat) else PromptFormat(template)
    prompt_ids = tokenizer(fmt.render(prompt, tokenizer), add_special_tokens=False)["input_ids"]
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
