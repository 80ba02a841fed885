"""The scheduling benchmark (benchmarks/schedule_sim.py --quick): every checkpoint evaluated once in both modes, and
streaming's first safety number first. At the quick time factor Ray's own overhead dwarfs the stand-ins' waits, so
wall times are not checked here; benchmarks/RESULTS.md has the full run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.ray  # the simulation runs on a local Ray cluster
def test_quick_run_is_sane(tmp_path: Path) -> None:
    out = tmp_path / "schedule.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "schedule_sim.py"), "--quick", "--json", str(out)],
                   check=True, timeout=180, cwd=tmp_path, capture_output=True)
    result = json.loads(out.read_text())
    seq, stream = result["modes"]
    assert len(result["trials"]) == 36
    for mode in (seq, stream):
        assert mode["trials_run"] == 36 and mode["evaluations"] == 36 and mode["evaluated_once"], mode["mode"]
        assert 0 < mode["gpu_busy"] <= 1
        assert mode["first_safety_s"] <= mode["wall_s"]
    # the split: sequential trains on all 32 GPUs, then evaluates on all 32; streaming keeps one node for the pool
    assert (seq["training_gpus"], seq["pool_gpus"], stream["training_gpus"], stream["pool_gpus"]) == (32, 32, 24, 8)
    assert seq["training_done_s"] <= seq["first_safety_s"]  # sequential: no safety number before training ends
    assert stream["first_safety_s"] < stream["training_done_s"]  # streaming: the first one while training goes on
    assert stream["first_safety_s"] < seq["first_safety_s"]
