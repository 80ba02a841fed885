"""Engine start vs weight swap (issue 24): what a pool replica pays per full checkpoint with and without resident
engines, for the demo world's model and a ~25M-parameter Llama (random init, the demo world's tokenizer).

For each model, two checkpoints of one shape (the model, and a copy with every weight moved by seeded noise, as
a fine-tune leaves it). Each round, models interleaved: start the pool's engine (``AsyncVLLMEngine``, vLLM's
``AsyncLLM`` with its engine-core process, as a replica runs it) on A and time it up to its first answer; then
swap B in and A back (``AsyncVLLMEngine.swap``: ``reload_weights`` through capsafe's worker extension, the tied
lm_head re-packed, the prefix cache reset), timing each swap up to the first answer after it; the swapped
engine's probe ids are compared with a fresh engine's once per model. Ratios are medians over rounds.

    .venv/bin/python benchmarks/weight_swap.py [--rounds 3] [--hidden 512 --layers 6]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))


def perturbed_copy(model_dir: str, out: Path, seed: int = 1) -> str:
    """``model_dir`` with every weight moved by seeded noise (half of each tensor's spread), tokenizer copied."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * param.std().clamp(min=1e-3) * 0.5)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return str(out)


async def _first_answer(engine: Any) -> list[list[int]]:
    return list(await engine.probe(8))


async def one_round(a: str, b: str, check: bool) -> dict[str, Any]:
    from capsafe.evaluate.vllm_engine import AsyncVLLMEngine

    tick = time.perf_counter()
    engine = await asyncio.to_thread(AsyncVLLMEngine, a, max_model_len=256)
    a_ids = await _first_answer(engine)
    start_s = time.perf_counter() - tick
    swaps, b_ids = [], None
    for target in (b, a):
        tick = time.perf_counter()
        await engine.swap(target)
        ids = await _first_answer(engine)
        swaps.append(time.perf_counter() - tick)
        b_ids = ids if target == b else b_ids
    back_ids = await _first_answer(engine)
    engine.close()
    row: dict[str, Any] = {"start_s": start_s, "swap_s": swaps, "a_back_exact": back_ids == a_ids}
    if check:
        fresh = await asyncio.to_thread(AsyncVLLMEngine, b, max_model_len=256)
        row["b_swapped_equals_fresh"] = b_ids == await _first_answer(fresh)
        fresh.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args()

    from train_throughput import build_model
    from transformers import AutoModelForCausalLM

    from capsafe.runtime.ray_shell import cache_root
    from capsafe.spec import load_spec
    from capsafe.world import build_world

    world = build_world(load_spec(REPO / "jobs" / "demo.yaml").world, cache_root() / "worlds", log=print)
    with tempfile.TemporaryDirectory() as tmp:
        big = str(build_model(world, Path(tmp) / "big", args.hidden, args.layers))
        models = {"demo world model": str(world.model_dir), "25M Llama": big}
        pairs = {name: (a, perturbed_copy(a, Path(tmp) / f"{i}-b")) for i, (name, a) in enumerate(models.items())}
        sizes = {name: sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(a).parameters())
                 for name, (a, _) in pairs.items()}
        rows: dict[str, list[dict[str, Any]]] = {name: [] for name in pairs}
        for r in range(args.rounds):
            for name, (a, b) in pairs.items():
                rows[name].append(asyncio.run(one_round(a, b, check=r == 0)))
                print(name, json.dumps(rows[name][-1]), flush=True)
    print("\n| model | parameters | engine start s (median) | swap s (median) | start / swap | swapped = fresh "
          "engine | A -> B -> A exact |\n|---|---|---|---|---|---|---|")
    for name, runs in rows.items():
        start = statistics.median(r["start_s"] for r in runs)
        swap = statistics.median(s for r in runs for s in r["swap_s"])
        print(f"| {name} | {sizes[name] / 1e6:.1f}M | {start:.1f} | {swap:.3f} | {start / swap:.0f} | "
              f"{runs[0]['b_swapped_equals_fresh']} | {all(r['a_back_exact'] for r in runs)} |")


if __name__ == "__main__":
    main()
