"""Streaming evaluation's queue (no Ray: an evaluation that records what it is given), the run's resource
sizing for both schedules, and the HTTP port check."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from capsafe.common.checkpoints import CHECKPOINT_META
from capsafe.common.results import write_table
from capsafe.errors import SpecError
from capsafe.evaluate.http_api import check_port_free
from capsafe.evaluate.stream import StreamingEvaluation
from capsafe.runtime.capacity import local_cpus
from capsafe.spec import load_spec

REPO = Path(__file__).resolve().parent.parent
MICRO = REPO / "tests" / "specs" / "micro.yaml"


def _kept(results: Path, trial: str, steps: list[int]) -> None:
    rows = []
    for step in steps:
        ckpt = results / "models" / trial / f"step-{step}"
        (ckpt / "model").mkdir(parents=True)
        (ckpt / CHECKPOINT_META).write_text(json.dumps({"kind": "full"}))
        rows.append({"trial_id": trial, "level": step / 100, "reached": True, "step": step, "capability": 0.1,
                     "tokens": 1, "elapsed_s": 1.0, "checkpoint": str(ckpt), "served_capability": None,
                     "confirmed_capability": None, "confirmed_items": None, "postprocess": None,
                     "evaluation_started_at": None})
    write_table(results, "checkpoints", rows, fragment=trial)


class _Run:
    """An ``EvalRun`` stand-in: records the models of each call; the first call waits for ``release``."""

    def __init__(self, results: Path, fail_on: str | None = None) -> None:
        self.spec, self.paths, self.results_dir = load_spec(MICRO), {"model.path": "BASE"}, results
        self.calls: list[list[tuple[str, int]]] = []
        self.started, self.release, self.fail_on = threading.Event(), threading.Event(), fail_on

    def evaluate(self, models: dict) -> None:
        if not self.calls:
            self.started.set()
            self.release.wait(10)
        self.calls.append(sorted(models))
        if self.fail_on and any(t == self.fail_on for t, _ in models):
            raise RuntimeError("engine died")


def test_queued_trials_are_evaluated_together_once_the_busy_one_is_done(tmp_path: Path) -> None:
    run, logs = _Run(tmp_path), []
    _kept(tmp_path, "a", [10, 20])
    _kept(tmp_path, "b", [30])
    with StreamingEvaluation(run, logs.append) as stream:  # type: ignore[arg-type]
        stream.submit("base")
        assert run.started.wait(10)
        stream.submit("a")  # queued while the base model is evaluated ...
        stream.submit("b")
        run.release.set()
    # ... and taken together: every kept checkpoint (rungs and target) of both, each once
    assert run.calls == [[("base", 0)], [("a", 10), ("a", 20), ("b", 30)]]
    assert stream.evaluated == ["base", "a", "b"]


def test_an_evaluation_error_waits_for_the_sweep_then_fails_the_run(tmp_path: Path) -> None:
    run, logs = _Run(tmp_path, fail_on="a"), []
    run.release.set()
    _kept(tmp_path, "a", [10])
    _kept(tmp_path, "b", [20])
    stream = StreamingEvaluation(run, logs.append)  # type: ignore[arg-type]
    stream.submit("a")
    stream.thread.join(0.5)
    stream.submit("b")  # the sweep goes on; nothing more is evaluated after the error
    with pytest.raises(RuntimeError, match="engine died"):
        stream.close()
    assert run.calls == [[("a", 10)]]
    assert any("--resume evaluates what is missing" in line for line in logs)


def test_streaming_holds_the_pool_beside_training_sequential_after_it() -> None:
    spec = load_spec(MICRO)  # 2 workers x 0.5 CPU and a 0.1-CPU trial driver, 1 trial at a time; 1 replica x 1 CPU
    assert local_cpus(spec, pool_beside_training=True) == pytest.approx(1.1 + 1 + 0.5)
    assert local_cpus(spec, pool_beside_training=False) == pytest.approx(1.1 + 0.5)


def test_a_port_in_use_stops_the_run_before_anything_is_written(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SpecError, match=f"127.0.0.1:{port}"):
            check_port_free("127.0.0.1", port)
        proc = subprocess.run([sys.executable, "-m", "capsafe.cli", "run", str(MICRO), f"output_dir={tmp_path}",
                               f"eval.http={{port: {port}}}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "eval.http" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "micro").exists()
    check_port_free("127.0.0.1", port)  # free again once released
