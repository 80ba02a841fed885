"""Both engines for real on the demo world's model: transformers in-process, vLLM (CPU build) in a subprocess
(vLLM spawns its engine processes, which needs a __main__ guard)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from capsafe.engines import TransformersEngine
from capsafe.formatting import render_prompt
from capsafe.world import PROMPT_TEMPLATE

VLLM_SCRIPT = """
import json, sys
from capsafe.vllm_engine import VLLMEngine
if __name__ == "__main__":
    engine = VLLMEngine(sys.argv[1], max_model_len=256)
    prompts = json.loads(sys.argv[2])
    first = engine.generate(prompts, 24)
    second = engine.generate(prompts, 24)
    engine.close()
    print("RESULT" + json.dumps([first, second]))
"""


def _prompts(world) -> list[str]:
    rows = []
    for suite in ("harmful", "overrefusal", "benign"):
        with open(world.suites[suite]) as fh:
            rows += [json.loads(line)["prompt"] for line in fh][:8]
    return [render_prompt(PROMPT_TEMPLATE, p) for p in rows]


def test_transformers_engine_answers_and_refuses(micro_world) -> None:
    engine = TransformersEngine(str(micro_world.model_dir))
    out = engine.generate(_prompts(micro_world), 24)
    assert len(out) == 24 and all(isinstance(o, str) and o for o in out)
    assert sum("sorry" in o or "can not" in o for o in out[:8]) >= 6  # the aligned base refuses harmful asks


@pytest.mark.slow
def test_vllm_engine_matches_transformers_greedy_and_repeats(micro_world, tmp_path: Path) -> None:
    prompts = _prompts(micro_world)
    script = tmp_path / "run_vllm.py"
    script.write_text(VLLM_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(micro_world.model_dir), json.dumps(prompts)],
                          capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                            "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    first, second = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert first == second  # greedy float32 on CPU is repeatable
    reference = TransformersEngine(str(micro_world.model_dir)).generate(prompts, 24)
    assert first == reference
