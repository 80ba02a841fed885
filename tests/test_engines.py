"""Both engines for real on the demo world's model: transformers in-process, vLLM (CPU build) in a subprocess
(vLLM spawns its engine processes, which needs a __main__ guard): the asynchronous engine the pool's replicas
run and the offline one. Greedy, seeded sampling, LoRA adapters on the base engine, and the perplexity scores
of the coherence judge."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from capsafe.common.formatting import Encoder, load_tokenizer
from capsafe.common.generation import Completion, Sampling
from capsafe.evaluate.engines import TransformersEngine


def plain(completions: list[Completion]) -> list[list]:
    """Completions as the vLLM subprocess reports them in JSON: text, generated ids and finish reason, all
    compared."""
    return [[c.text, list(c.token_ids), c.finish_reason] for c in completions]

VLLM_SCRIPT = """
import asyncio, json, sys
from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind
from capsafe.common.generation import Sampling
from capsafe.evaluate.vllm_engine import AsyncVLLMEngine, VLLMEngine

async def greedy_ids(engine, prompts):
    params = SamplingParams(temperature=0.0, max_tokens=16, output_kind=RequestOutputKind.FINAL_ONLY)
    outs = await asyncio.gather(*(engine._run(p, params) for p in prompts))
    return [list(o.outputs[0].token_ids) for o in outs]

async def pool_engine(model, adapter, tuned, prompts, refusal):
    # as a pool replica runs it: vLLM's AsyncLLM (LoRA enabled), every call's prompts streamed in concurrently
    kwargs = dict(max_model_len=256, enable_lora=True, max_loras=2, max_lora_rank=8)
    engine = AsyncVLLMEngine(model, **kwargs)
    greedy, sampled = Sampling(24), Sampling(24, temperature=1.0, seed=7)
    out = {
        "greedy": [await engine.generate(prompts, greedy), await engine.generate(prompts, greedy)],
        "sampled": [await engine.generate(prompts, sampled), (await engine.generate(prompts[::-1], sampled))[::-1]],
        "other_seed": await engine.generate(prompts, Sampling(24, temperature=1.0, seed=8)),
        "cut": await engine.generate(prompts, Sampling(3)),  # max_tokens ends most answers: 'length'
        "adapter": await engine.generate(prompts, greedy, adapter),
        "base_after_adapter": await engine.generate(prompts, greedy),
        # requests arriving together share the engine's steps (continuous batching), scoring among them
        "mixed": list(await asyncio.gather(
            engine.generate(prompts, greedy, adapter), engine.generate(prompts, greedy),
            engine.generate(prompts, sampled), engine.nll(prompts, [refusal] * len(prompts)))),
    }
    # the same engine swapped A (the base model) -> B (a full checkpoint) -> A, then B without the re-pack
    out["a"] = await greedy_ids(engine, prompts)
    await engine.swap(tuned)
    out["b_swapped"], out["b_probe"] = await greedy_ids(engine, prompts), await engine.probe(8)
    await engine.swap(model)
    out["a_back"] = await greedy_ids(engine, prompts)
    await engine.swap(tuned, repack_tied=False)  # the swap before the fix: the tied lm_head keeps a's packed copy
    out["b_stale_head"] = await greedy_ids(engine, prompts)
    engine.close()
    fresh = AsyncVLLMEngine(tuned, **kwargs)
    out["b_fresh"], out["b_fresh_probe"] = await greedy_ids(fresh, prompts), await fresh.probe(8)
    fresh.close()
    return out

if __name__ == "__main__":
    model, adapter, tuned = sys.argv[1], sys.argv[2], sys.argv[3]
    prompts, refusal = json.loads(sys.argv[4]), json.loads(sys.argv[5])
    out = asyncio.run(pool_engine(model, adapter, tuned, prompts, refusal))
    # the offline engine (benchmarks' direct baseline), in this process
    offline = VLLMEngine(model, max_model_len=256, enable_lora=True, max_loras=2, max_lora_rank=8, in_process=True)
    out["offline"] = offline.generate_many([(prompts, Sampling(24), adapter), (prompts, Sampling(24), None)])
    out["offline_nll"] = offline.nll(prompts, [refusal] * len(prompts))
    offline.close()
    # a Completion as [text, generated ids, finish reason] (tests/test_engines.py ``plain``)
    print("RESULT" + json.dumps(out, default=lambda c: [c.text, list(c.token_ids), c.finish_reason]))
"""


def _encoder(world) -> Encoder:
    return Encoder(load_tokenizer(world.model_dir), world.prompt_format())


def _prompts(world) -> list[list[int]]:
    rows = []
    for suite in ("harmful", "overrefusal", "benign"):
        with open(world.suites[suite]) as fh:
            rows += [json.loads(line)["prompt"] for line in fh][:8]
    encoder = _encoder(world)
    return [encoder.prompt(p) for p in rows]


REFUSAL = "sorry , i can not help with that ."


def test_transformers_engine_greedy_sampling_adapters_and_nll(micro_world, random_adapter: str) -> None:
    engine = TransformersEngine(str(micro_world.model_dir))
    prompts = _prompts(micro_world)
    out = engine.generate(prompts, Sampling(24))
    assert len(out) == 24 and all(isinstance(o, Completion) and o.text for o in out)
    assert sum("sorry" in o.text or "can not" in o.text for o in out[:8]) >= 6  # the aligned base refuses harmful asks
    # the ids the model generated, up to its stop id, and why each answer ended
    tok = load_tokenizer(micro_world.model_dir)
    assert all(tok.decode(list(o.token_ids), skip_special_tokens=True).strip() == o.text for o in out)
    assert all((o.finish_reason == "stop") == (len(o.token_ids) < 24) for o in out)  # greedy: ended iff short
    assert any(o.finish_reason == "stop" for o in out)
    cut = engine.generate(prompts, Sampling(3))
    assert [c.token_ids for c in cut] == [o.token_ids[:3] for o in out]
    assert [c.finish_reason for c in cut] == ["length" if len(o.token_ids) > 3 else "stop" for o in out]
    assert any(c.finish_reason == "length" for c in cut)
    sampled = Sampling(24, temperature=1.0, seed=3)
    first = engine.generate(prompts, sampled)
    assert engine.generate(prompts[::-1], sampled)[::-1] == first  # same (prompt, seed): same text
    assert engine.generate(prompts, Sampling(24, temperature=1.0, seed=4)) != first
    tuned = engine.generate(prompts, Sampling(24), random_adapter)
    assert tuned != out and engine.generate(prompts, Sampling(24)) == out  # base requests skip the adapter
    encoder = _encoder(micro_world)
    nll = engine.nll(prompts[:8], [encoder.continuation(REFUSAL)] * 8)
    gibberish = engine.nll(prompts[:8], [encoder.continuation("cake 7 the the , , of banana")] * 8)
    assert all(math.isfinite(x) for x in nll) and sum(nll) < sum(gibberish)
    assert math.isnan(engine.nll(prompts[:1], [encoder.continuation("")])[0])


@pytest.fixture(scope="module")
def vllm_run(micro_world, random_adapter: str, tuned_full_checkpoint: str, tmp_path_factory) -> dict:
    """One subprocess, one asynchronous engine for both tests below (an engine start is most of their cost)."""
    prompts = _prompts(micro_world)
    script = tmp_path_factory.mktemp("vllm") / "run_vllm.py"
    script.write_text(VLLM_SCRIPT)
    refusal = _encoder(micro_world).continuation(REFUSAL)
    args = [sys.executable, str(script), str(micro_world.model_dir), random_adapter, tuned_full_checkpoint,
            json.dumps(prompts), json.dumps(refusal)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


@pytest.mark.slow
def test_vllm_engine_matches_transformers_and_repeats(micro_world, random_adapter: str, vllm_run: dict) -> None:
    prompts, out = _prompts(micro_world), vllm_run
    refusal = _encoder(micro_world).continuation(REFUSAL)
    reference = TransformersEngine(str(micro_world.model_dir))
    first, second = out["greedy"]
    assert first == second  # greedy float32 on CPU is repeatable
    assert first == plain(reference.generate(prompts, Sampling(24)))  # text, ids and finish reason
    assert out["cut"] == plain(reference.generate(prompts, Sampling(3)))
    assert any(c[2] == "length" for c in out["cut"])
    assert out["sampled"][0] == out["sampled"][1]  # seeded sampling is repeatable, whatever the batch order
    assert out["other_seed"] != out["sampled"][0]
    # vLLM's LoRA request gives what transformers + PEFT gives
    assert out["adapter"] == plain(reference.generate(prompts, Sampling(24), random_adapter))
    assert out["base_after_adapter"] == first  # base rows stay base once an adapter is loaded
    # concurrent requests (continuous batching, scoring held alone on a LoRA engine) answer as if sent alone
    expected = reference.nll(prompts, [refusal] * len(prompts))
    assert out["mixed"][:3] == [out["adapter"], first, out["sampled"][0]]
    assert out["mixed"][3] == pytest.approx(expected, rel=1e-3, abs=1e-3)
    # the offline engine gives the same
    assert out["offline"] == [out["adapter"], first]
    assert out["offline_nll"] == pytest.approx(expected, rel=1e-3, abs=1e-3)


@pytest.mark.slow
def test_a_weight_swap_gives_a_fresh_engines_greedy_ids_a_to_b_to_a(micro_world, vllm_run: dict) -> None:
    """One asynchronous engine (as a pool replica runs it, LoRA enabled) swapped A -> B -> A gives, token id for
    token id, what a freshly started engine gives for each checkpoint (float32 on CPU: exact). Without the
    tied lm_head's re-pack it does not (the defect issue 24 found: the swapped engine kept A's packed output
    projection), so this test fails on the naive swap."""
    prompts, out = _prompts(micro_world), vllm_run
    assert sum(a != b for a, b in zip(out["a"], out["b_fresh"], strict=True)) >= len(prompts) // 2  # B differs
    assert out["b_swapped"] == out["b_fresh"]
    assert out["b_probe"] == out["b_fresh_probe"]  # what the pool's swap check compares
    assert out["a_back"] == out["a"]
    assert out["b_stale_head"] != out["b_fresh"]  # the naive swap is wrong, and this comparison sees it
