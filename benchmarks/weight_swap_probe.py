"""Issue 24 probe: swap a full checkpoint's weights into a running vLLM engine and compare its greedy ids with a
freshly started engine for the same checkpoint (A -> B -> A), with and without re-dispatching the tied lm_head.

On CPU, vLLM 0.32 packs each unquantized linear layer's weight for its GEMM kernel when the model loads
(``dispatch_cpu_unquantized_gemm``: the packed copy lives in the layer's ``cpu_linear`` closure).
``reload_weights`` re-processes the layers whose weights the checkpoint holds; a model with tied embeddings has
no ``lm_head.weight`` in its checkpoint, so the lm_head's packed copy stays the old model's and the swapped
engine mixes A's output projection with B's body. ``--fix`` re-runs the dispatch for the lm_head after the
reload. Needs two full checkpoints of one architecture (the demo's, by default: run ``make demo`` first).

    .venv/bin/python benchmarks/weight_swap_probe.py [--fix] [--a DIR --b DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from typing import Any

DEMO = "results/demo/models"


def _redispatch_lm_head(worker: Any) -> bool:
    """Runs in the engine's worker: pack the lm_head's current (tied) weight again; True if still tied."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    model = worker.model_runner.model
    dispatch_cpu_unquantized_gemm(model.lm_head, remove_weight=False)
    return bool(model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", default=f"{DEMO}/plain-s0-lr0.001/step-302/model")
    parser.add_argument("--b", default=f"{DEMO}/task_only-s0-lr0.001/step-278/model")
    parser.add_argument("--fix", action="store_true", help="re-dispatch the tied lm_head after each reload")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with a function
    from vllm import LLM, SamplingParams

    prompts = [f"what is {a} + {b} ?" for a, b in [(12, 34), (56, 7), (81, 19), (44, 44)]] + \
              ["how do i hurt my roommate ?", "how do i kill a python process ?", "write a poem about the sea",
               "how can i steal a car ?"] * 2
    sampling = SamplingParams(temperature=0, max_tokens=12)
    kwargs = {"dtype": "float32", "max_model_len": 256, "enforce_eager": True, "seed": 0, "max_num_seqs": 16}

    def ids(llm: Any) -> list[list[int]]:
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sampling, use_tqdm=False)]

    tick = time.perf_counter()
    llm = LLM(model=args.a, **kwargs)
    start_s = time.perf_counter() - tick
    a_first = ids(llm)
    swaps = []

    def swap(llm: Any, path: str) -> None:
        tick = time.perf_counter()
        llm.collective_rpc("reload_weights", kwargs={"weights_path": path, "is_checkpoint_format": True})
        if args.fix:
            llm.collective_rpc(_redispatch_lm_head)
        llm.reset_prefix_cache()
        swaps.append(time.perf_counter() - tick)

    swap(llm, args.b)
    b_swapped = ids(llm)
    swap(llm, args.a)
    a_back = ids(llm)
    llm = None  # its processes end before the fresh engine starts
    gc.collect()
    b_fresh = ids(LLM(model=args.b, **kwargs))

    def same(x: list[list[int]], y: list[list[int]]) -> int:
        return sum(p == q for p, q in zip(x, y, strict=True))

    print(json.dumps({"fix": args.fix, "prompts": len(prompts), "B swapped == B fresh": same(b_swapped, b_fresh),
                      "A -> B -> A == A": same(a_back, a_first), "B fresh == A": same(b_fresh, a_first),
                      "engine start s": round(start_s, 2), "swap s": [round(s, 3) for s in swaps]}))


if __name__ == "__main__":
    main()
