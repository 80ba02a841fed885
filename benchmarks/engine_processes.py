"""vLLM's asynchronous engine on CPU with its model worker in a second process (vLLM 0.32's choice on CPU) against
the worker inside the engine-core process (capsafe's choice since issue 24's suite work:
``vllm_engine.worker_in_engine_core``). Each round starts one engine per layout, alternating, each in a fresh
interpreter (the choice is per process); it times the start up to the first answer, then a batch of greedy
generations (continuous batching, as a replica serves a suite), and counts the engine's processes.

    .venv/bin/python benchmarks/engine_processes.py [--rounds 3] [--prompts 64] [--tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = """
import asyncio, json, os, sys, time
from pathlib import Path
layout, model, n, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
import capsafe.evaluate.vllm_engine as ve
if layout == "two processes":
    ve.worker_in_engine_core = lambda: {}  # vLLM's own choice on CPU: the multiprocess executor
from capsafe.common.generation import Sampling

def children(pid):
    kids = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.add(int(p.name))
            except OSError:
                pass
    return kids | {g for k in kids for g in children(k)}

async def main():
    tick = time.perf_counter()
    engine = await asyncio.to_thread(ve.AsyncVLLMEngine, model, max_model_len=256)
    await engine.probe(8)
    start = time.perf_counter() - tick
    procs = len([p for p in children(os.getpid()) if "resource_tracker" not in
                 Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")])
    prompts = [[engine.tokenizer.bos_token_id or 1, 10 + i % 200, 20 + i % 50] for i in range(n)]
    tick = time.perf_counter()
    outs = await engine.generate(prompts, Sampling(tokens))
    gen = time.perf_counter() - tick
    engine.close()
    print("RESULT" + json.dumps({"start_s": start, "generate_s": gen, "processes": procs,
                                 "tokens": sum(len(o.token_ids) for o in outs)}))

if __name__ == "__main__":
    asyncio.run(main())
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from capsafe.runtime.ray_shell import cache_root
    from capsafe.spec import load_spec
    from capsafe.world import build_world

    world = build_world(load_spec(REPO / "tests" / "specs" / "micro.yaml").world, cache_root() / "worlds",
                        log=lambda m: None)
    layouts = ("two processes", "worker in engine core")
    results: dict[str, list[dict]] = {layout: [] for layout in layouts}
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(REPO)}
    for round_ in range(args.rounds):
        for layout in layouts if round_ % 2 == 0 else layouts[::-1]:
            proc = subprocess.run([sys.executable, "-c", CHILD, layout, str(world.model_dir), str(args.prompts),
                                   str(args.tokens)], capture_output=True, text=True, env=env, timeout=600)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            row = json.loads(proc.stdout.split("RESULT", 1)[1])
            results[layout].append(row)
            print(f"round {round_ + 1} {layout}: start {row['start_s']:.1f} s, {row['tokens']} tokens in "
                  f"{row['generate_s']:.2f} s, {row['processes']} engine process(es)", flush=True)
    print("\n| layout | engine start (median s) | generation (median tokens/s) | processes |\n|---|---|---|---|")
    for layout in layouts:
        rows = results[layout]
        start = statistics.median(r["start_s"] for r in rows)
        tps = statistics.median(r["tokens"] / r["generate_s"] for r in rows)
        print(f"| {layout} | {start:.1f} | {tps:.0f} | {rows[0]['processes']} |")
    two, one = (statistics.median(r["start_s"] for r in results[k]) for k in layouts)
    print(f"\nstart ratio (worker in engine core / two processes): {one / two:.2f}")


if __name__ == "__main__":
    main()
