"""Evaluation throughput: generated tokens/s through capsafe's Serve pool vs direct ``vllm.LLM.generate``.

Same model (by default a ~25M-parameter Llama, random init, built from the demo world's tokenizer so that
compute dominates), same prompts (the demo world's safety suites), same greedy decoding and max tokens. Tokens
are the generated texts re-tokenised, counted the same way for every row (greedy outputs are compared, too).
Rows, in one run so they share the machine:

for each N in ``--cpus`` (default 1 and 2):

- direct: one ``VLLMEngine`` (capsafe's offline vLLM wrapper, a thin shell over ``LLM.generate``) in this
  process, all prompts in one call, its engine with N OpenMP threads;
- the pool with 1 replica of N CPUs (the replica's engine is vLLM's ``AsyncLLM``), prompts sent as capsafe
  sends them (chunks, concurrently, through ``PoolClient``): pool / direct at N CPUs is the pool's efficiency
  (goal >= 0.9 for both);

then the pool with 2 replicas of 1 CPU each: against the 1 x 1 row, the scaling from 1 to 2 replicas.
Engine start-up is excluded everywhere (each engine answers one warm-up request first).

    .venv/bin/python benchmarks/eval_throughput.py [--prompts 192] [--max-new-tokens 32] [--cpus 1 2]
        [--hidden 512 --layers 6] [--chunk 32] [--ongoing 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))


def _prompts(world: Any, tokenizer: Any, n: int) -> list[list[int]]:
    """``n`` suite prompts as the tokenization contract feeds them to the model."""
    from capsafe.common.formatting import Encoder

    rows: list[str] = []
    for name in ("harmful", "overrefusal", "benign"):
        with open(world.suites[name]) as fh:
            rows += [json.loads(line)["prompt"] for line in fh]
    encoder = Encoder(tokenizer, world.prompt_format())
    return [encoder.prompt(p) for p in (rows * (n // len(rows) + 1))[:n]]


def _tokens(answers: list[Any]) -> int:
    """Generated tokens: the engine's own ids of each answer."""
    return sum(len(a.token_ids) for a in answers)


def direct(model: str, prompts: list[list[int]], max_new_tokens: int, threads: int) -> tuple[list[Any], float]:
    from capsafe.common.generation import Sampling
    from capsafe.evaluate.vllm_engine import VLLMEngine

    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by the engine process it spawns: a replica of N CPUs gets N
    engine = VLLMEngine(model, max_model_len=256)
    engine.generate(prompts[:4], Sampling(max_new_tokens))  # warm-up
    tick = time.perf_counter()
    out = engine.generate(prompts, Sampling(max_new_tokens))
    spent = time.perf_counter() - tick
    engine.close()
    return out, spent


def pooled(model: str, prompts: list[list[int]], max_new_tokens: int, replicas: int, cpus: float,
           chunk: int, ongoing: int) -> tuple[list[Any], float]:
    from ray import serve

    from capsafe.common.generation import Sampling, Target
    from capsafe.evaluate.pool_client import PoolClient
    from capsafe.evaluate.serve_pool import build_pool, deployment_options, start_pool, stop_pool

    app = build_pool("vllm", {"max_model_len": 256}, deployment_options(replicas, cpus, 0.0), max_models=1,
                     max_ongoing_requests=ongoing)
    pool = PoolClient(start_pool(app, "bench"), retries=0, log=print)
    target, sampling = Target(model), Sampling(max_new_tokens)
    # warm up every replica: concurrent requests spill onto the replicas that have not loaded the model yet
    warm = [pool.generate(target, prompts[:2], sampling) for _ in range(4 * replicas)]
    for f in warm:
        f.result()
    tick = time.perf_counter()
    futures = [pool.generate(target, prompts[i:i + chunk], sampling) for i in range(0, len(prompts), chunk)]
    out = [a for f in futures for a in f.result()]
    spent = time.perf_counter() - tick
    pool.close()
    stop_pool("bench")
    serve.shutdown()
    return out, spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=192)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2], help="CPUs per replica (and direct threads)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--chunk", type=int, default=32, help="prompts per request (capsafe's default)")
    parser.add_argument("--ongoing", type=int, default=4, help="max ongoing requests per replica (default 4)")
    args = parser.parse_args()

    from train_throughput import build_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from capsafe.runtime.ray_shell import cache_root, ray_session
    from capsafe.spec import load_spec
    from capsafe.world import build_world

    world = build_world(load_spec(REPO / "jobs" / "demo.yaml").world, cache_root() / "worlds", log=print)
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_model(world, Path(tmp) / "model", args.hidden, args.layers))
        params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model).parameters())
        tokenizer = AutoTokenizer.from_pretrained(model)
        prompts = _prompts(world, tokenizer, args.prompts)
        print(f"model: {params / 1e6:.1f}M parameters; {len(prompts)} prompts, {args.max_new_tokens} new tokens")
        rows: list[tuple[str, list[str], float]] = []
        for cpus in args.cpus:  # each pool row right after its direct row: they share the machine's state
            out, spent = direct(model, prompts, args.max_new_tokens, cpus)
            rows.append((f"direct VLLMEngine ({cpus} threads)", out, spent))
            with ray_session(None, 2 * max(args.cpus)):
                out, spent = pooled(model, prompts, args.max_new_tokens, 1, float(cpus), args.chunk, args.ongoing)
            rows.append((f"pool, 1 replica x {cpus} CPU", out, spent))
        with ray_session(None, 2 * max(args.cpus)):
            out, spent = pooled(model, prompts, args.max_new_tokens, 2, 1.0, args.chunk, args.ongoing)
        rows.append(("pool, 2 replicas x 1 CPU", out, spent))
    reference = rows[0][1]
    print("\n| run | generated tokens | seconds | tokens/s | same outputs as direct |\n|---|---|---|---|---|")
    tps = {}
    for name, out, spent in rows:
        n = _tokens(out)
        tps[name] = n / spent
        print(f"| {name} | {n} | {spent:.1f} | {n / spent:.0f} | {out == reference} |")
    for cpus in args.cpus:
        ratio = tps[f"pool, 1 replica x {cpus} CPU"] / tps[f"direct VLLMEngine ({cpus} threads)"]
        print(f"pool / direct at {cpus} CPU(s): {ratio:.2f} (goal >= 0.9)")
    if "pool, 1 replica x 1 CPU" in tps:
        scaling = tps["pool, 2 replicas x 1 CPU"] / tps["pool, 1 replica x 1 CPU"]
        print(f"2 replicas / 1 replica (1 CPU each): {scaling:.2f}")


if __name__ == "__main__":
    main()
