"""The GPU check kit (``benchmarks/gpu_check.py``). Its CPU smoke run (``--smoke``) runs the same code the GPU run
uses — the Llama-3-convention fixture builder, capsafe's trial planner and training core under DeepSpeed (ZeRO-2
and ZeRO-3, full and LoRA, gradient checkpointing off and on, over gloo), ZeRO-3 consolidation, the bare loop and
the transformers engine — on a tiny model, with ``ray`` and ``vllm`` made unimportable (the GPU machine has
neither), so the kit cannot rot without CI noticing. The GPU-only choices (the plan: engine device and dtype,
steps and timing rounds) and the stage runner (JSON after every stage, the budget) are checked directly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check_plan as kit  # noqa: E402

VARIANTS = sorted(f"zero{s}-{m}-{c}" for s in (2, 3) for m in ("full", "lora") for c in ("ckpt", "nockpt"))
# Run as the GPU machine would, except that importing ray or vllm (or anything under them) fails there as it
# would where they are not installed: an import that creeps into the kit's path breaks this test.
BLOCKED_RUN = """
import importlib.abc, runpy, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "vllm"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the GPU machine has no ray or vllm)")
sys.meta_path.insert(0, Blocker())
sys.argv = ["benchmarks/gpu_check.py", *sys.argv[1:]]
try:
    runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
finally:
    print("imported:", sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in ("ray", "vllm")}))
"""


def _smoke(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCKED_RUN, "--smoke", "--out", str(out), *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def test_gpu_check_smoke_runs_every_variant_on_cpu_without_ray_or_vllm(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    proc = _smoke(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "imported: []" in proc.stdout
    figures = json.loads(out.read_text())
    assert figures["failed"] == [] and figures["skipped"] == [] and figures["complete"]
    assert "all checks passed" in proc.stdout
    assert sorted(figures["variants"]) == VARIANTS
    for result in figures["variants"].values():
        assert result["tokens_per_s"] > 0 and 0 < result["eval_share"] < 1 and result["checkpoint"]
        assert result["rounds"] >= 2 and result["round_steps"] == figures["plan"]["round_steps"]
    assert figures["zero3_full_consolidation_max_abs_diff"] == 0.0
    assert figures["zero3_lora_consolidation_max_abs_diff"] == 0.0
    assert figures["bare_tokens_per_s"] > 0 and figures["bare"]["master_weights"] == "float32"
    assert figures["generation_tokens_per_s"] > 0 and figures["generation_device"] == "cpu"
    # the trials run on one torch thread; the generation figure must not inherit it
    assert figures["generation_torch_threads"] == figures["torch_threads"]
    assert figures["mfu"] is None  # no GPU peak to divide by on CPU
    assert list(figures["stages_s"])[:4] == ["zero2-full-nockpt", "bare", "consolidation-full",
                                             "consolidation-lora"]


def test_gpu_check_budget_stops_starting_stages_and_keeps_the_figures(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    proc = _smoke(out, "--budget-s", "0")
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["variants"] == {} and not figures["complete"] and len(figures["skipped"]) == 12
    assert "not run (past --budget-s 0)" in proc.stdout


def test_the_gpu_plan_generates_on_the_gpu_in_bf16_and_times_20_steps_away_from_evaluations() -> None:
    p = kit.plan(gpu=True)
    assert (p.engine_device, p.engine_dtype, p.precision) == ("cuda", "bfloat16", "bf16")
    assert p.round_steps >= 20 and p.gen_max_s <= 60
    for steps in (p.key_steps, p.steps):  # every variant: >= 2 rounds, none next to an evaluation or a save
        evals = kit.evaluation_steps(steps, p.eval_every)
        rounds = kit.timing_rounds([(s, 1.0, 100) for s in range(1, steps + 1)], evals, p.round_steps, p.warmup,
                                   p.settle)
        assert len(rounds) >= 2 and all(n == p.round_steps for n, _, _ in rounds)
    smoke = kit.plan(gpu=False)
    assert (smoke.engine_device, smoke.engine_dtype) == ("cpu", "float32")


def test_timing_rounds_leave_out_the_start_and_the_steps_around_an_evaluation() -> None:
    # steps 1-12, evaluations after steps 5 and 12; slow steps 1, 5-7 and 12 must not be timed
    slow = {1, 5, 6, 7, 12}
    steps = [(s, 10.0 if s in slow else 1.0, 100) for s in range(1, 13)]
    rounds = kit.timing_rounds(steps, [5, 12], length=3, warmup=1, settle=2)
    assert rounds == [(3, 3.0, 300), (3, 3.0, 300)]  # steps 2-4 and 8-10; 11 is a stretch too short
    figures = kit.round_figures(rounds)
    assert figures["tokens_per_s"] == 100 and figures["spread"] == 0 and figures["rounds"] == 2
    with pytest.raises(ValueError, match="no timed round"):
        kit.round_figures(kit.timing_rounds(steps, [5, 12], length=6, warmup=1, settle=2))


def test_stages_write_the_json_after_each_and_none_starts_past_the_deadline(tmp_path: Path) -> None:
    out, now = tmp_path / "figures.json", [0.0]
    figures: dict = {}
    seen: list[dict] = []

    def stage(name: str, seconds: float):
        def run() -> None:
            seen.append(json.loads(out.read_text()) if out.exists() else {})  # what a cut-off run would leave
            figures[name] = True
            now[0] += seconds
        return name, run

    skipped = kit.run_stages([stage("a", 5), stage("b", 10), stage("c", 1), stage("d", 1)], figures, out,
                             deadline=12.0, clock=lambda: now[0])
    assert skipped == ["c", "d"] and figures["skipped"] == ["c", "d"]
    assert seen[0] == {} and seen[1]["a"] is True and "b" not in seen[1]
    written = json.loads(out.read_text())
    assert written["a"] and written["b"] and "c" not in written and written["stages_s"] == {"a": 5, "b": 10}


def test_the_transformers_engine_loads_in_the_dtype_it_is_given(tmp_path: Path) -> None:
    import torch
    from gpu_check import build_fixture

    from capsafe.evaluate.engines import TransformersEngine

    model, _ = build_fixture(tmp_path / "model", "tiny", ["what is 1 + 2 ?", "3"])
    assert next(TransformersEngine(str(model)).model.parameters()).dtype == torch.float32  # the default
    engine = TransformersEngine(str(model), dtype=torch.bfloat16)
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    ids = engine.tokenizer("what is 1 + 2 ?")["input_ids"]
    assert len(engine.nll([ids], [ids[:2]])) == 1
