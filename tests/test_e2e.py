"""The real flow end to end on a micro spec: Ray Train + DeepSpeed (ZeRO-3, 2 workers), Ray Tune stopping at
the target, a Ray Serve pool of vLLM engines, Parquet results and the report. Minutes, not seconds."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from capsafe.results import read_table

REPO = Path(__file__).resolve().parent.parent
MICRO = "tests/specs/micro.yaml"
pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


def _check_results(out: Path, engine: str, methods: set[str]) -> None:
    trials = read_table(out, "trials").to_pandas()
    assert set(trials["method"]) == {"base"} | methods
    base = trials[trials["method"] == "base"].iloc[0]
    assert base["status"] == "base" and base["capability"] < 0.05
    trajectory = read_table(out, "trajectory").to_pandas()
    for _, t in trials[trials["method"] != "base"].iterrows():
        traj = trajectory[trajectory["trial_id"] == t["trial_id"]].sort_values("step")
        assert not traj.empty
        if t["reached"]:
            # stopped at the first evaluation at/above the target, and kept that checkpoint
            first = traj[traj["capability"] >= t["target"]].iloc[0]
            assert t["step"] == first["step"] == traj["step"].max()
            assert t["capability"] == pytest.approx(first["capability"])
            model = Path(t["checkpoint"]) / "model"
            assert (model / "config.json").is_file() or (model / "adapter_config.json").is_file()
        else:
            assert t["status"] == "not_reached" and traj["step"].max() == 200
    gens = read_table(out, "generations").to_pandas()
    judg = read_table(out, "judgments").to_pandas()
    evaluated = set(trials[(trials["method"] == "base") | trials["reached"]]["trial_id"])
    assert set(gens["trial_id"]) == evaluated
    assert set(gens["engine"]) == {engine}
    assert set(gens["suite"]) == {"harmful", "overrefusal", "benign"}
    assert not judg.duplicated(["trial_id", "suite", "prompt_id", "judge"]).any()
    assert len(judg) == 2 * len(gens)
    assert (out / "report.md").read_text().count("| base |") == 1
    for name in ("trials", "trajectory"):
        pq.read_table(out / f"{name}.parquet")  # plain Parquet, readable without capsafe


def test_run_micro_flow_with_vllm(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "capsafe.cli", "run", MICRO, f"output_dir={tmp_path}"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = tmp_path / "micro"
    _check_results(out, "vllm", {"plain", "safety_mix"})
    assert "| plain |" in proc.stdout  # the report is printed at the end


def _ray_pids(temp_dir: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if temp_dir in cmd:
                pids.append(int(entry.name))
    return pids


def test_submit_as_a_ray_job_to_a_real_head_with_lora(tmp_path: Path) -> None:
    temp_dir = tempfile.mkdtemp(prefix="csray-", dir="/tmp")  # short: Ray's socket paths are length-limited
    env = _env()
    start = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--port=6391", "--dashboard-port=8277",
         "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--num-cpus=3", f"--temp-dir={temp_dir}",
         "--include-dashboard=true", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180)
    try:
        assert start.returncode == 0, start.stderr[-3000:]
        env["RAY_AUTH_MODE"] = "token"
        proc = subprocess.run(
            [sys.executable, "-m", "capsafe.cli", "submit", MICRO, "--address", "http://127.0.0.1:8277",
             f"output_dir={tmp_path}", "methods=[{name: plain}]", "eval.engine=transformers",
             # the other half of the training matrix: LoRA adapters under ZeRO-2 (merged for evaluation)
             "train.mode=lora", "train.zero_stage=2", "train.learning_rates=[0.01]"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
        assert "SUCCEEDED" in proc.stdout
        _check_results(tmp_path / "micro", "transformers", {"plain"})
    finally:
        pids = _ray_pids(temp_dir)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 20
        while time.time() < deadline and _ray_pids(temp_dir):
            time.sleep(0.5)
        for pid in _ray_pids(temp_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
