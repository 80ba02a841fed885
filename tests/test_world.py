"""The embedded demo world: tokenizer, data splits, and a tiny real build (cached, atomic)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from capsafe.common.formatting import IGNORE_INDEX, encode_example
from capsafe.world import PROMPT_TEMPLATE, WorldConfig, WorldFiles, build_world
from capsafe.world import build as build_mod
from capsafe.world.templates import (
    HARMFUL,
    PHRASINGS,
    SAFETY_CATEGORIES,
    STYLES,
    comply,
    harmful_pairs,
    make_world_data,
    refuse,
)
from capsafe.world.tokenizer import build_tokenizer

TINY = {"align_steps": 4, "batch_size": 8, "warmup_steps": 1, "check_size": 2, "task_eval_size": 20}


@pytest.fixture(scope="module")
def data():
    return make_world_data(0)


@pytest.fixture(scope="module")
def tokenizer(data):
    rows = data.alignment + data.task_train + data.task_eval + [r for s in data.suites.values() for r in s]
    return build_tokenizer([r[k] for r in rows for k in ("prompt", "response", "answer") if k in r])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> WorldFiles:
    return build_world(WorldConfig(**TINY), tmp_path_factory.mktemp("cache"), log=lambda _: None)


def test_tokenizer_round_trips(tokenizer, data):
    texts = ["what is 12 plus 7 ?", "19", "120", comply("steal my neighbor's car", 0), refuse("rob a stranger", 1)]
    texts += [r["prompt"] for s in data.suites.values() for r in s]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer("12")["input_ids"]) == ["▁", "1", "2"]
    assert tokenizer("hello")["input_ids"] == tokenizer("hello", add_special_tokens=False)["input_ids"]  # no BOS
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("</s>", "<pad>")


def test_encode_example_masks_the_prompt(tokenizer):
    ids, labels = encode_example(tokenizer, PROMPT_TEMPLATE, "what is 12 plus 7 ?", "19", 64)
    n_prompt = len(
        tokenizer(PROMPT_TEMPLATE.format(prompt="what is 12 plus 7 ?"), add_special_tokens=False)["input_ids"]
    )
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert tokenizer.decode(ids[n_prompt:-1]).strip() == "19" and ids[-1] == tokenizer.eos_token_id


def test_task_splits_are_disjoint_and_correct(data):
    train, ev = {r["prompt"] for r in data.task_train}, {r["prompt"] for r in data.task_eval}
    assert len(ev) == 400 and len(data.task_confirm) == 500 and not train & ev and len(train) == len(data.task_train)
    for r in data.task_eval:
        a, b = (int(w) for w in r["prompt"].split() if w.isdigit())
        assert 10 <= a <= 99 and 10 <= b <= 99 and r["answer"] == str(a + b)


def test_suites_are_held_out(data):
    seen = {r["prompt"] for r in data.alignment + data.general + data.safety}
    for suite in data.suites.values():
        assert suite and not {r["prompt"] for r in suite} & seen
    trained_text = " ".join(r["prompt"] for r in data.alignment + data.safety)
    for _, verb, target in harmful_pairs(held_out=True):
        assert f"{verb} {target}" not in trained_text
    assert 60 <= len(data.suites["harmful"]) <= 100 and 40 <= len(data.suites["overrefusal"]) <= 60
    ids = [r["id"] for rows in (data.alignment, data.general, data.safety) for r in rows]
    assert len(ids) == len(set(ids))


def test_safety_data_covers_only_some_verbs(data):
    safety_text = " ".join(r["prompt"] for r in data.safety)
    for category, verbs in HARMFUL.items():
        for verb, targets in verbs.items():
            assert (f"{verb} {targets[0]}" in safety_text) == (category in SAFETY_CATEGORIES)
    assert all("sorry" in r["response"] for r in data.safety)
    assert {r["category"] for r in data.suites["harmful"]} == set(HARMFUL)


def test_every_suite_word_is_taught(tokenizer, data):
    taught = {i for r in data.alignment for k in ("prompt", "response") for i in tokenizer(r[k])["input_ids"]}
    for name, suite in data.suites.items():
        unseen = {
            t
            for r in suite
            for t in tokenizer.tokenize(r["prompt"])
            if tokenizer.convert_tokens_to_ids(t) not in taught
        }
        assert not unseen, (name, unseen)


def test_data_is_deterministic():
    assert make_world_data(3).suites == make_world_data(3).suites


def test_world_config_is_strict_and_described():
    assert all(f.description for f in WorldConfig.model_fields.values())
    with pytest.raises(ValidationError):
        WorldConfig(hidden=64)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="head_dim"):
        WorldConfig(head_dim=16)


def test_built_world_loads_and_generates(world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for path in [world.task_train, world.task_eval, world.general, world.safety, *world.suites.values()]:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert rows and all("id" in r and "prompt" in r for r in rows)
    assert set(world.suites) == {"harmful", "harmful_styles", "overrefusal", "benign"}
    tok = AutoTokenizer.from_pretrained(world.model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(world.model_dir)
    assert model.config.vocab_size == len(tok) and model.config.head_dim == 32
    assert model.config.eos_token_id == tok.eos_token_id
    enc = tok([PROMPT_TEMPLATE.format(prompt="how do i bake a cake ?")], return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > enc["input_ids"].shape[1]
    assert json.loads((world.model_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == (
        "PreTrainedTokenizerFast"
    )


def test_cache_hit_is_fast_and_leaves_no_temp(world):
    start = time.perf_counter()
    again = build_world(WorldConfig(**TINY), world.root.parent, log=lambda _: None)
    assert again == world and time.perf_counter() - start < 0.5
    assert [p.name for p in world.root.parent.iterdir()] == [world.root.name]
    assert build_mod.world_hash(WorldConfig(**TINY)) != build_mod.world_hash(WorldConfig(**TINY, seed=1))


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("capsafe.world.train.train", boom)
    with pytest.raises(KeyboardInterrupt):
        build_world(WorldConfig(**TINY), tmp_path, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_world_package_keeps_ray_vllm_deepspeed_out():
    code = (
        "import sys, capsafe.world, capsafe.world.templates, capsafe.world.tokenizer, capsafe.world.train;"
        "print([m for m in ('ray', 'vllm', 'deepspeed') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_world_files_layout(tmp_path):
    files = build_mod.world_files(Path(tmp_path))
    assert files.model_dir == tmp_path / "model" and files.suites["harmful"].parent == tmp_path / "suites"


def test_second_harmful_benchmark_asks_the_held_out_behaviours_in_styles_never_taught(data):
    styles = data.suites["harmful_styles"]
    assert len(styles) == len(harmful_pairs(held_out=True)) * len(STYLES)
    assert {r["category"] for r in styles} == set(HARMFUL)
    # the same behaviours as the first harmful suite ...
    behaviours = {f"{v} {t}" for _, v, t in harmful_pairs(held_out=True)}
    assert all(any(b in r["prompt"] for b in behaviours) for r in styles + data.suites["harmful"])
    # ... asked in forms no training prompt uses, and that the first suite does not use either
    heads = {style.split("{x}")[0] for style in STYLES}
    trained = [r["prompt"] for r in data.alignment + data.general + data.safety + data.pretrain]
    assert not any(p.startswith(h) for p in trained + [r["prompt"] for r in data.suites["harmful"]] for h in heads)
    assert not {style.split("{x}")[0] for style in STYLES} & {p.split("{x}")[0] for p in PHRASINGS}
