"""The GPU check kit's CPU smoke run (``benchmarks/gpu_check.py --smoke``): the same code the GPU run uses —
the Llama-3-convention fixture builder, capsafe's trial planner and training core under DeepSpeed (ZeRO-2 and
ZeRO-3, full and LoRA, gradient checkpointing off and on, over gloo), ZeRO-3 consolidation, the bare loop and
the transformers engine — on a tiny model, so the kit cannot rot without CI noticing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_smoke_runs_every_variant_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["failed"] == [] and "all checks passed" in proc.stdout
    assert sorted(figures["variants"]) == sorted(f"zero{s}-{m}-{c}" for s in (2, 3) for m in ("full", "lora")
                                                 for c in ("ckpt", "nockpt"))
    for result in figures["variants"].values():
        assert result["tokens_per_s"] > 0 and 0 < result["eval_share"] < 1 and result["checkpoint"]
    assert figures["zero3_full_consolidation_max_abs_diff"] == 0.0
    assert figures["zero3_lora_consolidation_max_abs_diff"] == 0.0
    assert figures["bare_tokens_per_s"] > 0 and figures["generation_tokens_per_s"] > 0
    assert figures["mfu"] is None  # no GPU peak to divide by on CPU
