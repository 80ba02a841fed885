"""Tokenizers that follow real models' special-token conventions, built locally (no hub), and tiny models on them.

The demo world's own word-level tokenizer adds nothing and has no chat template, so it cannot show how a real
model is fed. These can:

- ``llama3``: byte-level BPE; ``<|begin_of_text|>`` added by the post-processor; Meta-Llama-3-8B-Instruct's chat
  template (``{{ bos_token }}`` and header tokens); ``<|eot_id|>`` closes a turn and is *not* the tokenizer's EOS
  (``<|end_of_text|>``); the generation config stops on both, as Llama 3's does.
- ``chatml``: byte-level BPE, no BOS, Qwen2-Instruct's ChatML template (``<|im_start|>`` / ``<|im_end|>``, a default
  system message); EOS ``<|im_end|>``, pad ``<|endoftext|>``.
- ``inst``: SentencePiece-style BPE (``▁`` word prefixes), ``<s>`` added by the post-processor, Llama-2-chat's
  ``[INST] ... [/INST]`` template with ``<<SYS>>`` and ``</s>`` after each answer.
- ``mistral``: the real Mistral-7B v0.1 SentencePiece model that the ``mistral_common`` package ships, converted
  by transformers, with Mistral-7B-Instruct-v0.1's template.

The vocabulary is learnt from the given texts, so a tiny model stays tiny; digits are split one by one (as
Llama 2 and Qwen split them) so arithmetic stays learnable. The chat templates are copied verbatim from the
models' ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
import re
import shutil
import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONVENTIONS = ("llama3", "chatml", "inst", "mistral")

# meta-llama/Meta-Llama-3-8B-Instruct, tokenizer_config.json
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 "
    "%}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen/Qwen2-7B-Instruct, tokenizer_config.json
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant"
    "\n' }}{% endif %}"
)
# meta-llama/Llama-2-7b-chat-hf, tokenizer_config.json
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ "
    "raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if "
    "loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>"
    "\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if "
    "message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] "
    "== 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# mistralai/Mistral-7B-Instruct-v0.1, tokenizer_config.json
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ "
    "raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if "
    "message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
    "'assistant' %}{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}"
)

# Llama 3's pre-tokenizer pattern with single digits (Llama 3 groups up to three).
_BYTE_LEVEL_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                     r"\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class Convention:
    """One model family's special tokens, who adds BOS, its chat template and what generation stops on."""

    name: str
    specials: tuple[str, ...]        # in id order, first ids of the vocabulary
    bos: str | None
    eos: str
    pad: str | None
    unk: str | None
    adds_bos: bool                   # the post-processor puts BOS before every text
    template: str
    generation_eos: tuple[str, ...]  # generation_config.json eos_token_id
    byte_level: bool


CONVENTION_SPECS = {
    "llama3": Convention("llama3", ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                    "<|end_header_id|>", "<|eot_id|>"),
                         "<|begin_of_text|>", "<|end_of_text|>", None, None, True, LLAMA3_TEMPLATE,
                         ("<|end_of_text|>", "<|eot_id|>"), True),
    "chatml": Convention("chatml", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>",
                         "<|endoftext|>", None, False, CHATML_TEMPLATE, ("<|im_end|>", "<|endoftext|>"), True),
    "inst": Convention("inst", ("<unk>", "<s>", "</s>"), "<s>", "</s>", None, "<unk>", True, LLAMA2_TEMPLATE,
                       ("</s>",), False),
}


def _corpus(texts: Iterable[str], convention: Convention) -> list[str]:
    """Training texts for the BPE: the given texts plus chat renderings of some of them, special tokens removed
    (they are added whole, never learnt from characters)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    base = list(texts)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = lambda message: None
    template = env.from_string(convention.template)
    chats = []
    for prompt, answer in zip(base[0::2][:200], base[1::2][:200], strict=False):
        for system in (None, "be helpful ."):
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            chats.append(template.render(messages=messages, bos_token=convention.bos or "", eos_token=convention.eos,
                                         add_generation_prompt=True))
    pattern = re.compile("|".join(re.escape(s) for s in convention.specials))
    return base + [pattern.sub(" ", c) for c in chats]


def build_convention_tokenizer(name: str, texts: Iterable[str], vocab_size: int = 3000) -> Any:
    """A fast tokenizer following convention ``name`` (not 'mistral'), its BPE learnt from ``texts``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    conv = CONVENTION_SPECS[name]
    tok = Tokenizer(models.BPE(unk_token=conv.unk))
    if conv.byte_level:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_BYTE_LEVEL_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
            pre_tokenizers.Digits(individual_digits=True)])
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        alphabet = list(string.ascii_letters + string.digits + string.punctuation)  # no unknowns in plain text
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(conv.specials), initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(_corpus(texts, conv), trainer=trainer)
    if conv.adds_bos and conv.bos:
        bos_id = tok.token_to_id(conv.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{conv.bos} $A", pair=f"{conv.bos} $A {conv.bos} $B", special_tokens=[(conv.bos, bos_id)])
    named = {conv.bos, conv.eos, conv.pad, conv.unk}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=conv.bos, eos_token=conv.eos, pad_token=conv.pad, unk_token=conv.unk,
        additional_special_tokens=[s for s in conv.specials if s not in named], chat_template=conv.template,
        clean_up_tokenization_spaces=False, model_max_length=4096)


def mistral_tokenizer_file() -> Path:
    """The real Mistral-7B v0.1 SentencePiece model shipped inside the mistral_common package (a vLLM
    dependency)."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall mistral_common (vLLM installs it)")
    return path


def load_mistral_tokenizer(workdir: Path) -> Any:
    """Mistral-7B v0.1's real tokenizer (32000 pieces, ``<s>`` added by its post-processor) with
    Mistral-7B-Instruct-v0.1's chat template."""
    from transformers import AutoTokenizer

    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(mistral_tokenizer_file(), workdir / "tokenizer.model")
    (workdir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "legacy": False, "add_bos_token": True, "add_eos_token": False, "chat_template": MISTRAL_TEMPLATE}))
    return AutoTokenizer.from_pretrained(str(workdir))


def generation_eos_ids(name: str, tokenizer: Any) -> list[int]:
    """The ids a model of this convention lists as ``eos_token_id`` in its generation config."""
    if name == "mistral":
        return [tokenizer.eos_token_id]
    return [tokenizer.convert_tokens_to_ids(t) for t in CONVENTION_SPECS[name].generation_eos]


def save_model_with_convention(model: Any, tokenizer: Any, name: str, directory: Path) -> None:
    """Save ``model`` and ``tokenizer`` with the convention's generation config (its list of stop ids)."""
    model.generation_config.eos_token_id = generation_eos_ids(name, tokenizer)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast" if name != "mistral" else "LlamaTokenizer"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def build_tiny_model(name: str, directory: Path, texts: Iterable[str], seed: int = 0, hidden: int = 64,
                     layers: int = 2, heads: int = 2, head_dim: int = 32) -> Path:
    """A randomly initialised tiny Llama whose tokenizer follows convention ``name``, saved to ``directory``
    (model, tokenizer, generation config): what tests feed through every stage."""
    from capsafe.world.train import make_model

    tokenizer = load_mistral_tokenizer(directory / "_sentencepiece") if name == "mistral" else \
        build_convention_tokenizer(name, texts)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = make_model(tokenizer, hidden, layers, heads, head_dim, hidden * 2, seed)
    save_model_with_convention(model, tokenizer, name, directory)
    shutil.rmtree(directory / "_sentencepiece", ignore_errors=True)
    return directory
