"""Evaluation throughput: generated tokens/s through capsafe's Serve pool vs direct ``vllm.LLM.generate``.

Same model (by default a ~25M-parameter Llama, random init, built from the demo world's tokenizer so that
compute dominates), same prompts (the demo world's safety suites), same greedy decoding and max tokens. Tokens
are the generated texts re-tokenised, counted the same way for every row (greedy outputs are compared, too).
Rows, in one run so they share the machine:

1. direct: one ``VLLMEngine`` (capsafe's vLLM wrapper, a thin shell over ``LLM.generate``) in this process,
   all prompts in one call, with ``--threads`` torch threads;
2. the pool with 1 replica of ``--threads`` CPUs, prompts sent as capsafe sends them (chunks, concurrently,
   through ``PoolClient``): ratio 2/1 is the pool's efficiency (goal >= 0.9);
3. the pool with 1 replica of 1 CPU and 4. with 2 replicas of 1 CPU each: ratio 4/3 is the scaling from 1 to 2
   replicas.

Engine start-up is excluded everywhere (each engine answers one warm-up request first).

    .venv/bin/python benchmarks/eval_throughput.py [--prompts 192] [--max-new-tokens 32] [--threads 2]
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
    from capsafe.formatting import Encoder

    rows: list[str] = []
    for name in ("harmful", "overrefusal", "benign"):
        with open(world.suites[name]) as fh:
            rows += [json.loads(line)["prompt"] for line in fh]
    encoder = Encoder(tokenizer, world.prompt_format())
    return [encoder.prompt(p) for p in (rows * (n // len(rows) + 1))[:n]]


def _tokens(tokenizer: Any, texts: list[str]) -> int:
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)


def direct(model: str, prompts: list[list[int]], max_new_tokens: int) -> tuple[list[str], float]:
    from capsafe.engines import Sampling
    from capsafe.vllm_engine import VLLMEngine

    engine = VLLMEngine(model, max_model_len=256)
    engine.generate(prompts[:4], Sampling(max_new_tokens))  # warm-up
    tick = time.perf_counter()
    out = engine.generate(prompts, Sampling(max_new_tokens))
    spent = time.perf_counter() - tick
    engine.close()
    return out, spent


def pooled(model: str, prompts: list[list[int]], max_new_tokens: int, replicas: int, cpus: float,
           chunk: int, ongoing: int) -> tuple[list[str], float]:
    from ray import serve

    from capsafe.engines import Sampling
    from capsafe.panel import Target
    from capsafe.pool_client import PoolClient
    from capsafe.serve_pool import build_pool, deployment_options, start_pool, stop_pool

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
    out = [text for f in futures for text in f.result()]
    spent = time.perf_counter() - tick
    pool.close()
    stop_pool("bench")
    serve.shutdown()
    return out, spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=192)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--chunk", type=int, default=32, help="prompts per request (capsafe's default)")
    parser.add_argument("--ongoing", type=int, default=4, help="max ongoing requests per replica (default 4)")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the direct engine gets what a replica of --threads CPUs gets

    from train_throughput import build_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from capsafe.ray_shell import cache_root, ray_session
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
        out, spent = direct(model, prompts, args.max_new_tokens)
        rows.append((f"direct VLLMEngine ({args.threads} threads)", out, spent))
        with ray_session(None, 2 * args.threads):
            for replicas, cpus in ((1, float(args.threads)), (1, 1.0), (2, 1.0)):
                out, spent = pooled(model, prompts, args.max_new_tokens, replicas, cpus, args.chunk,
                                     args.ongoing)
                rows.append((f"pool, {replicas} replica(s) x {cpus:g} CPU", out, spent))
    reference = rows[0][1]
    print("\n| run | generated tokens | seconds | tokens/s | same outputs as direct |\n|---|---|---|---|---|")
    tps = []
    for name, out, spent in rows:
        n = _tokens(tokenizer, out)
        tps.append(n / spent)
        print(f"| {name} | {n} | {spent:.1f} | {n / spent:.0f} | {out == reference} |")
    print(f"\npool / direct at equal CPUs: {tps[1] / tps[0]:.2f} (goal >= 0.9); "
          f"2 replicas / 1 replica (1 CPU each): {tps[3] / tps[2]:.2f}")


if __name__ == "__main__":
    main()
