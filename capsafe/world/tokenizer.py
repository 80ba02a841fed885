"""A word-level tokenizer over the world's vocabulary, saved as a Hugging Face fast tokenizer directory that
``transformers.AutoTokenizer`` and vLLM both load."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<user>", "<assistant>"]


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Metaspace keeps each word's leading space in the token so decoding restores spaces exactly; digits are
    # split one by one so any number is spelled with ten tokens, including sums the model has never seen.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Punctuation(),
        ]
    )


def build_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A tokenizer whose vocabulary is every pre-token of ``texts`` plus the ten digits, in a fixed order."""
    pre = _pre_tokenizer()
    pieces = {piece for text in texts for piece, _ in pre.pre_tokenize_str(text)}
    pieces |= {str(d) for d in range(10)} | {"▁"}
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + sorted(pieces - set(SPECIAL_TOKENS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens(SPECIAL_TOKENS)
    # No post-processor: nothing (no BOS) is added, so training and serving see the same ids.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<user>", "<assistant>"],
        clean_up_tokenization_spaces=False,
        model_max_length=256,
        padding_side="left",
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json into ``directory``."""
    tokenizer.save_pretrained(str(directory))
    # transformers 5 writes its new class name; the classic alias loads in every version and in vLLM.
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
