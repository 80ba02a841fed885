"""The tokenization contract: the one place where a request becomes token ids.

Training examples, the in-training capability evaluation, both engines, perplexity scoring and LLM-judge
inputs all take their ids from here and never tokenize text themselves, so a model is fed the same ids at
every stage. The rules follow the model's own tokenizer:

- **Without a chat template** the rendered text is tokenized without special tokens and the tokenizer's own
  prefix (the BOS its post-processor adds: Llama, Mistral; nothing for GPT-2 or Qwen) is put in front, once.
  The training target is the response followed by EOS.
- **With a chat template** the template's text is tokenized without special tokens: the template writes BOS
  itself (Llama-3's ``{{ bos_token }}``, Llama-2's ``bos_token + '[INST] '``) or has none (ChatML). This is
  how ``apply_chat_template(tokenize=True)`` and vLLM's chat endpoint tokenize. The training target is the
  assistant turn as the template renders it, up to and including its end-of-turn token (``<|eot_id|>``,
  ``<|im_end|>``, ``</s>``).
- **Generation stops** on the tokenizer's EOS, the generation config's ``eos_token_id`` (one id or a list) and
  the template's end-of-turn token (``stop_ids``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100


def render_prompt(template: str, prompt: str) -> str:
    """The text the model sees before it answers, e.g. ``"<user> what is 2 plus 3 ? <assistant>"``."""
    return template.replace("{prompt}", prompt)


class TemplateError(ValueError):
    """A chat template that cannot be used as the contract needs (no template, or a generation prompt that is
    not a prefix of the rendered conversation)."""


@dataclass(frozen=True)
class PromptFormat:
    """How a request becomes model input: a text template, optionally inside the tokenizer's chat template."""

    template: str = "{prompt}"
    chat_template: bool = False
    system_prompt: str | None = None

    def messages(self, prompt: str) -> list[dict[str, str]]:
        """The chat messages of one request (system message first when there is one)."""
        text = render_prompt(self.template, prompt)
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": text}]

    def render(self, prompt: str, tokenizer: Any = None) -> str:
        """The prompt as text (for logs and reports; the model is fed ``Encoder.prompt``'s ids)."""
        if not self.chat_template:
            text = render_prompt(self.template, prompt)
            return f"{self.system_prompt}\n\n{text}" if self.system_prompt else text
        return chat_text(_require_template(tokenizer), self.messages(prompt), add_generation_prompt=True)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _require_template(tokenizer: Any) -> Any:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise TemplateError("model.chat_template is true but the tokenizer has no chat template; set "
                            "model.chat_template=false and give model.prompt_template instead.")
    return tokenizer


def load_tokenizer(model_path: str | Path) -> Any:
    """A model's tokenizer as every stage loads it (a missing pad token becomes EOS, as training pads)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def chat_text(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The chat template's text for ``messages``."""
    from jinja2 import TemplateError as JinjaError

    try:
        out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except JinjaError as exc:  # the template's own raise_exception(), e.g. Mistral's roles must alternate
        roles = [m["role"] for m in messages]
        fix = ("it takes no system message: set model.system_prompt (and eval.system_prompt) to null and put the "
               "instruction into model.prompt_template instead" if "system" in roles else
               "change the conversation or set model.chat_template=false with a model.prompt_template")
        raise TemplateError(f"the model's chat template refuses a conversation of roles {roles} ({exc}); "
                            f"{fix}") from None
    return str(out)


def _plain_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@lru_cache(maxsize=64)
def _prefix_of(tokenizer: Any) -> tuple[int, ...]:
    plain = _plain_ids(tokenizer, "a")
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return tuple(full[:start])
    return ()


def special_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before any text when asked for special tokens: BOS for Llama and Mistral
    tokenizers (their post-processor adds it), nothing for GPT-2 or Qwen."""
    return list(_prefix_of(tokenizer))


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """A raw text prompt (no chat template) as the tokenizer's convention wants it: its prefix once, then the
    text without special tokens. A text that already starts with the prefix (say, a BOS written into a
    prompt template) does not get it twice."""
    prefix, ids = special_prefix(tokenizer), _plain_ids(tokenizer, text)
    if prefix and ids[:len(prefix)] == prefix:
        return ids
    return prefix + ids


def encode_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """A conversation through the chat template; the template writes any BOS, so none is added here. A
    template that writes BOS twice (its own and one in the text) is refused rather than fed to the model."""
    text = chat_text(_require_template(tokenizer), messages, add_generation_prompt)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text != text.lstrip() and text.lstrip().startswith(bos):
        # Whitespace before BOS is a template artifact (Llama Guard 3's HF template renders " <|begin_of_text|>"):
        # tokenized, it puts a space token before BOS, which Meta's published prompt format (llama-models,
        # llama-stack's shield) does not have; the text path of the same prompt has none either.
        text = text.lstrip()
    ids = _plain_ids(tokenizer, text)
    prefix = special_prefix(tokenizer)
    if prefix and ids[:2 * len(prefix)] == prefix * 2:
        raise TemplateError("the chat template's text starts with BOS twice; remove the BOS from "
                            "model.prompt_template / the system prompt (the template writes it).")
    return ids


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids |= {i for i, tok in decoder.items() if getattr(tok, "special", False)}
    return ids


def assistant_turn(tokenizer: Any, messages: list[dict[str, str]], response: str) -> str:
    """The text the chat template adds for an assistant answer after the generation prompt of ``messages``."""
    head = chat_text(tokenizer, messages, add_generation_prompt=True)
    full = chat_text(tokenizer, [*messages, {"role": "assistant", "content": response}], add_generation_prompt=False)
    if not full.startswith(head):
        raise TemplateError("the chat template's generation prompt is not the start of the conversation it "
                            "renders with the answer, so no training target can be cut from it; use a template "
                            "whose add_generation_prompt output is a prefix of the full conversation.")
    return full[len(head):]


@lru_cache(maxsize=64)
def _end_of_turn(tokenizer: Any) -> int | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    probe = "ok"
    try:
        turn = assistant_turn(tokenizer, [{"role": "user", "content": "hi"}], probe)
    except TemplateError:
        # a template that writes its own task prompt whatever the turn (Llama Guard's) has no assistant turn to
        # read the end of turn from; its generation config's eos ids still stop it
        return None
    ids = _plain_ids(tokenizer, turn)
    specials = _special_ids(tokenizer)
    content = _plain_ids(tokenizer, probe)
    # the first special token after the answer's text: <|eot_id|>, <|im_end|>, </s> ...
    after = next((k + len(content) for k in range(len(ids)) if ids[k:k + len(content)] == content), 0)
    return next((i for i in ids[after:] if i in specials), None)


def end_of_turn(tokenizer: Any) -> int | None:
    """The token that closes an assistant turn in the chat template (None without a template)."""
    return _end_of_turn(tokenizer)


def stop_ids(tokenizer: Any, generation_eos: int | list[int] | None = None) -> list[int]:
    """Every id generation stops on: EOS, the generation config's eos ids and the chat template's end of turn."""
    ids: list[int] = []
    extra = generation_eos if isinstance(generation_eos, list) else [generation_eos]
    for i in [tokenizer.eos_token_id, *extra, end_of_turn(tokenizer)]:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    return ids


def generation_eos(model_dir: str | Path) -> int | list[int] | None:
    """``eos_token_id`` of the model's ``generation_config.json`` (None when it has none)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return None
    value = json.loads(path.read_text()).get("eos_token_id")
    return value if isinstance(value, (int, list)) else None


@dataclass(frozen=True)
class Encoder:
    """One model's tokenizer with one prompt format: request -> prompt ids, (request, response) -> training ids
    and labels, response -> continuation ids. The only way capsafe turns text into model input."""

    tokenizer: Any
    fmt: PromptFormat = PromptFormat()

    def prompt(self, request: str) -> list[int]:
        """The ids the model sees before it answers ``request``."""
        if self.fmt.chat_template:
            return encode_chat(self.tokenizer, self.fmt.messages(request))
        return encode_text(self.tokenizer, self.fmt.render(request))

    def target(self, request: str, response: str) -> list[int]:
        """The ids the model is trained to produce after ``prompt(request)``: the assistant turn up to and
        including its end-of-turn token under a chat template, else the response and EOS."""
        tok = self.tokenizer
        if not self.fmt.chat_template:
            return _plain_ids(tok, response) + [tok.eos_token_id]
        messages = self.fmt.messages(request)
        head, turn = chat_text(tok, messages, add_generation_prompt=True), assistant_turn(tok, messages, response)
        prompt, whole = self.prompt(request), _plain_ids(tok, head + turn)
        # The turn as the whole conversation tokenizes it (SentencePiece would put a word-start piece before a
        # turn tokenized on its own), as long as the prompt's ids are exactly its beginning.
        ids = whole[len(prompt):] if whole[:len(prompt)] == prompt else _plain_ids(tok, turn)
        stops = set(stop_ids(tok))
        cut = next((k for k, i in enumerate(ids) if i in stops), None)
        # what a template writes after the end of turn (ChatML's newline) is never generated: not a target
        return ids[:cut + 1] if cut is not None else ids + [end_of_turn(tok) or tok.eos_token_id]

    def example(self, request: str, response: str, max_len: int | None) -> tuple[list[int], list[int]]:
        """Token ids and labels of one supervised example, cut to ``max_len`` tokens (None: not cut); the loss
        covers the target only. The prompt part is ``prompt(request)`` exactly, because generation later starts
        from those ids alone."""
        prompt, target = self.prompt(request), self.target(request, response)
        ids = (prompt + target)[:max_len]
        labels = ([IGNORE_INDEX] * len(prompt) + target)[:max_len]
        return ids, labels

    def continuation(self, response: str) -> list[int]:
        """A text as ids after a prompt, special tokens excluded: to score a text the model did not generate. A
        generated answer is scored on the ids the engine returned (``Completion.token_ids``): this re-tokenization
        of the stripped text can differ from them (a byte-level tokenizer's leading-space token)."""
        return _plain_ids(self.tokenizer, response)


def encode_example(tokenizer: Any, template: str | PromptFormat, prompt: str, response: str,
                   max_len: int) -> tuple[list[int], list[int]]:
    """``Encoder(tokenizer, fmt).example(...)`` for a format or a plain text template."""
    fmt = template if isinstance(template, PromptFormat) else PromptFormat(template)
    return Encoder(tokenizer, fmt).example(prompt, response, max_len)


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
