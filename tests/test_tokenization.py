"""The tokenization contract on tiny models whose tokenizers follow real conventions (Llama 3, ChatML / Qwen2,
Llama 2 [INST], and Mistral v0.1's real tokenizer file): every stage feeds a model the same prompt ids, with
BOS exactly once where the tokenizer adds one, trains on the assistant turn up to its end-of-turn token, and
stops generating there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from capsafe.common.data import Suite
from capsafe.common.formatting import (
    IGNORE_INDEX,
    Encoder,
    PromptFormat,
    TemplateError,
    encode_example,
    end_of_turn,
    generation_eos,
    load_tokenizer,
    special_prefix,
    stop_ids,
)
from capsafe.common.generation import Completion, Sampling, Target, greedy_generate, left_pad, model_stop_ids, texts
from capsafe.evaluate.engines import TransformersEngine
from capsafe.evaluate.fan_out import evaluate_models
from capsafe.evaluate.panel import CoherenceWithPerplexity, done
from capsafe.train.core import Host, capability_on

CONVENTIONS = ("llama3", "chatml", "inst", "mistral")
ADDS_BOS = {"llama3": True, "chatml": False, "inst": True, "mistral": True}
END_OF_TURN = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>", "inst": "</s>", "mistral": "</s>"}
REQUESTS = ["what is 12 plus 7 ?", "how do i pick a lock ?", "tell me a joke about cats"]
ANSWERS = ["19", "sorry , i can not help with that .", "here is a joke : cats nap all day ."]
CHAT = PromptFormat("{prompt}", chat_template=True)


def _bos_count(ids: list[int], tok) -> int:
    return sum(i == tok.bos_token_id for i in ids) if tok.bos_token_id is not None else 0


@pytest.mark.parametrize("name", CONVENTIONS)
def test_prompt_and_target_follow_the_convention(name: str, convention_model) -> None:
    model_dir = convention_model(name)
    tok = load_tokenizer(model_dir)
    assert special_prefix(tok) == ([tok.bos_token_id] if ADDS_BOS[name] else [])
    for fmt in (CHAT, PromptFormat("Q: {prompt} A:"), PromptFormat("Q: {prompt} A:", system_prompt="be brief .")):
        if name == "mistral" and fmt.system_prompt and fmt.chat_template:
            continue
        encoder = Encoder(tok, fmt)
        prompt = encoder.prompt(REQUESTS[0])
        # BOS exactly once, first, where the tokenizer adds one; never for ChatML
        assert _bos_count(prompt, tok) == (1 if ADDS_BOS[name] else 0)
        assert not ADDS_BOS[name] or prompt[0] == tok.bos_token_id
        ids, labels = encoder.example(REQUESTS[0], ANSWERS[0], 4096)
        assert ids[:len(prompt)] == prompt and all(x == IGNORE_INDEX for x in labels[:len(prompt)])
        target = [x for x in labels if x != IGNORE_INDEX]
        want_end = END_OF_TURN[name] if fmt.chat_template else tok.eos_token
        assert target[-1] == tok.convert_tokens_to_ids(want_end)  # the turn ends with its end-of-turn token
        assert ANSWERS[0] in tok.decode(target, skip_special_tokens=True)
    # what the old code fed vLLM: the chat template's text tokenized *with* special tokens
    rendered = CHAT.render(REQUESTS[0], tok)
    naive = tok(rendered, add_special_tokens=True)["input_ids"]
    assert _bos_count(naive, tok) == (2 if ADDS_BOS[name] else 0)  # twice: the template's and the tokenizer's
    # a template BOS written into a plain prompt template is not doubled either
    if tok.bos_token:
        assert _bos_count(Encoder(tok, PromptFormat(tok.bos_token + "Q: {prompt}")).prompt("x"), tok) == 1


@pytest.mark.parametrize("name", CONVENTIONS)
def test_stop_ids_come_from_tokenizer_generation_config_and_template(name: str, convention_model) -> None:
    model_dir = convention_model(name)
    tok = load_tokenizer(model_dir)
    eot = tok.convert_tokens_to_ids(END_OF_TURN[name])
    assert end_of_turn(tok) == eot
    stops = model_stop_ids(str(model_dir), tok)
    assert eot in stops and tok.eos_token_id in stops
    gen = generation_eos(model_dir)
    assert set(gen if isinstance(gen, list) else [gen]) <= set(stops)
    if name == "llama3":  # <|eot_id|> is not EOS: only the template and the generation config know it
        assert tok.eos_token_id != eot and stop_ids(tok) == [tok.eos_token_id, eot]


def test_a_template_whose_prompt_is_not_a_prefix_is_refused(convention_model) -> None:
    tok = load_tokenizer(convention_model("chatml"))
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}>{% endif %}")
    with pytest.raises(TemplateError, match="prefix"):
        Encoder(tok, CHAT).example("hi", "ok", 64)


class RecordingPool:
    """A pool over a real transformers engine that records every prompt it is sent. It answers with a fixed
    text: the random convention models often answer nothing, and an empty answer is never scored (every judge
    labels it 'empty'), which would leave the perplexity stage with nothing to check."""

    def __init__(self, engine: TransformersEngine) -> None:
        self.engine, self.generated, self.scored = engine, {}, []

    def generate(self, target: Target, prompts: list[list[int]], sampling: Sampling) -> Future:
        self.generated.setdefault(target.adapter, []).extend(prompts)
        ids = tuple(Encoder(self.engine.tokenizer).continuation("fine , thanks ."))
        return done([Completion("fine , thanks .", ids, "stop")] * len(prompts))

    def nll(self, model: str, prompts: list[list[int]], continuations: list[list[int]]) -> Future:
        self.scored += prompts
        return done(self.engine.nll(prompts, continuations))


class RecordingModel(torch.nn.Module):
    """Wraps a model; records the unpadded prompt ids of every ``generate`` call."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model, self.seen = model, []
        self.generation_config = model.generation_config

    def generate(self, input_ids, attention_mask, **kw):
        self.seen += [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask, strict=True)]
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kw)


def _stage_ids(model_dir: Path, fmt: PromptFormat, tmp_path: Path) -> dict[str, list[list[int]]]:
    """The prompt ids each stage produces for REQUESTS, captured where it hands them to a model."""
    tok = load_tokenizer(model_dir)
    encoder = Encoder(tok, fmt)
    stages: dict[str, list[list[int]]] = {"contract": [encoder.prompt(r) for r in REQUESTS]}
    # training examples: the unlabelled head of each example (Encoder.example builds it on Encoder.prompt, so this
    # stage checks that the label mask ends where the prompt does, not an independent encoding)
    stages["training"] = [[i for i, y in zip(*encode_example(tok, fmt, r, a, 4096), strict=True) if y == IGNORE_INDEX]
                          for r, a in zip(REQUESTS, ANSWERS, strict=True)]
    # the in-training capability evaluation, through the train loop's own function
    engine = TransformersEngine(str(model_dir))
    recorder = RecordingModel(engine.model)
    capability_on(SimpleNamespace(module=recorder), encoder, [{"prompt": r, "answer": "x"} for r in REQUESTS],
                  Host(0, 1, lambda m, d: None), 4, 8, "exact_match")
    stages["capability (training)"] = recorder.seen
    # the safety generations go through the evaluation driver and the pool (served capability's prompts are
    # checked on a real pool in tests/test_e2e.py: served == training capability for every kept checkpoint)
    pool = RecordingPool(engine)
    judges = [CoherenceWithPerplexity(str(model_dir), 1e9)]
    suite = Suite("s", "harmful", [{"id": str(n), "prompt": r} for n, r in enumerate(REQUESTS)])
    # a full checkpoint and a LoRA checkpoint (an adapter on the base engine) are sent the same ids
    evaluate_models({("base", 0): Target(str(model_dir)), ("lora", 1): Target(str(model_dir), "adapter")}, [suite],
                    encoder.prompt, Sampling(4), 1, pool, judges, "transformers", tmp_path, lambda m: None,
                    models_in_flight=1)
    stages["evaluation (pool)"] = pool.generated[None]
    stages["evaluation (pool, LoRA adapter)"] = pool.generated["adapter"]
    stages["perplexity (pool)"] = pool.scored[:len(REQUESTS)]
    stages["perplexity (pool, LoRA adapter)"] = pool.scored[len(REQUESTS):]
    engine.generate(stages["contract"], Sampling(4))
    stages["transformers engine"] = engine.seen
    return stages


TEXT = PromptFormat("<user> {prompt} <assistant>")


# a text template never touches the chat template: one convention that adds BOS and one that does not cover it
@pytest.mark.parametrize("name, fmt", [*[(n, CHAT) for n in CONVENTIONS], ("llama3", TEXT), ("chatml", TEXT)],
                         ids=[*[f"{n}-chat" for n in CONVENTIONS], "llama3-text", "chatml-text"])
def test_every_stage_feeds_the_same_ids(name: str, fmt: PromptFormat, convention_model, tmp_path: Path) -> None:
    """Through the chat template and through a text template (no chat template), for a full checkpoint and a
    LoRA one; the judge's own input is checked in tests/test_judge_formats.py (BOS once, from BOS)."""
    model_dir = convention_model(name)
    tok = load_tokenizer(model_dir)
    stages = _stage_ids(model_dir, fmt, tmp_path)
    want = stages["contract"]
    for stage, ids in stages.items():
        assert ids == want, stage
    for ids in want:
        assert _bos_count(ids, tok) == (1 if ADDS_BOS[name] else 0)


@pytest.fixture(scope="module")
def trained_llama3(convention_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Llama-3-convention model trained (plain torch) to answer REQUESTS with ANSWERS in its chat template."""
    from transformers import AutoModelForCausalLM

    from capsafe.world.train import train

    source = convention_model("llama3")
    tok = load_tokenizer(source)
    model = AutoModelForCausalLM.from_pretrained(source)
    examples = [Encoder(tok, CHAT).example(r, a, 4096) for r, a in zip(REQUESTS, ANSWERS, strict=True)]
    torch.manual_seed(0)
    train(model, examples, steps=120, lr=3e-3, batch_size=3, warmup_steps=10, seed=0, pad_id=tok.pad_token_id,
          log=lambda m: None, log_every=1000)
    out = tmp_path_factory.mktemp("llama3-trained")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_generation_stops_at_the_end_of_turn(trained_llama3: Path) -> None:
    tok = load_tokenizer(trained_llama3)
    engine = TransformersEngine(str(trained_llama3))
    prompts = [Encoder(tok, CHAT).prompt(r) for r in REQUESTS]
    answers = engine.generate(prompts, Sampling(24))
    assert texts(answers) == ANSWERS and {a.finish_reason for a in answers} == {"stop"}
    assert greedy_generate(engine.model, tok, prompts, 24, model_stop_ids(str(trained_llama3), tok)) == ANSWERS
    targets = [Encoder(tok, CHAT).target(r, a) for r, a in zip(REQUESTS, ANSWERS, strict=True)]
    with_stops = _new_tokens(engine.model, prompts, model_stop_ids(str(trained_llama3), tok), tok.pad_token_id)
    assert with_stops == targets  # the answer, then <|eot_id|>, then nothing
    assert [list(a.token_ids) + [t[-1]] for a, t in zip(answers, targets, strict=True)] == targets  # ids as generated
    # stopping on EOS alone (the old rule) runs past <|eot_id|>, which Llama 3 never writes as EOS
    eos_only = _new_tokens(engine.model, prompts, [tok.eos_token_id], tok.pad_token_id)
    assert all(len(e) > len(t) and e[:len(t)] == t for e, t in zip(eos_only, targets, strict=True))


def _new_tokens(model, prompts: list[list[int]], stop: list[int], pad: int) -> list[list[int]]:
    """The raw ids greedy generation produces after each prompt, up to and including the first stop id."""
    ids, mask = left_pad(prompts, pad)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=stop,
                         pad_token_id=pad)[:, ids.shape[1]:].tolist()
    return [row[:next((k + 1 for k, i in enumerate(row) if i in stop), len(row))] for row in out]


VLLM_SCRIPT = """
import json, sys
from capsafe.common.generation import Sampling
from capsafe.evaluate.vllm_engine import VLLMEngine
if __name__ == "__main__":
    jobs = json.loads(sys.argv[1])
    out = {}
    for model_dir, prompts in jobs.items():
        engine = VLLMEngine(model_dir, max_model_len=256, in_process=True)
        answers = [[a.text, list(a.token_ids), a.finish_reason] for a in engine.generate(prompts, Sampling(24))]
        seen = engine.seen
        engine.nll(prompts, [[p[-1]] for p in prompts])
        out[model_dir] = {"answers": answers, "seen": seen, "scored": [s[:-1] for s in engine.seen]}
        engine.close()
    print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_vllm_reports_back_the_contracts_ids_and_stops_at_the_end_of_turn(convention_model, trained_llama3: Path,
                                                                         tmp_path: Path) -> None:
    dirs = {name: convention_model(name) for name in CONVENTIONS if name != "llama3"}
    dirs["llama3"] = trained_llama3
    jobs = {str(d): [Encoder(load_tokenizer(d), CHAT).prompt(r) for r in REQUESTS] for d in dirs.values()}
    script = tmp_path / "run_vllm.py"
    script.write_text(VLLM_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), json.dumps(jobs)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    for name, d in dirs.items():
        got = out[str(d)]
        assert got["seen"] == jobs[str(d)] == got["scored"], name  # vLLM's prompt_token_ids: what was sent
        tok = load_tokenizer(d)
        assert all(_bos_count(ids, tok) == (1 if ADDS_BOS[name] else 0) for ids in got["seen"]), name
        reference = TransformersEngine(str(d)).generate(jobs[str(d)], Sampling(24))
        assert got["answers"] == [[a.text, list(a.token_ids), a.finish_reason] for a in reference], name
    # stopped at <|eot_id|>, like the transformers engine: the answer's ids without it, finish reason 'stop'
    assert [a[0] for a in out[str(trained_llama3)]["answers"]] == ANSWERS
    assert {a[2] for a in out[str(trained_llama3)]["answers"]} == {"stop"}
