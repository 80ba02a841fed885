"""A tokenizer of one id per character, for tests whose fake pools and judges need the tokenization contract but
no model (imported by the test modules, as tests/wandb_runs.py is)."""

from __future__ import annotations


class CharTokenizer:
    """One id per character, no special tokens, no chat template: enough for the contract on fake models."""

    chat_template = None
    eos_token_id = 0
    all_special_ids: list[int] = []

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(map(chr, ids))


CHARS = CharTokenizer()
