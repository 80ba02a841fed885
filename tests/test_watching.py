"""Watching a run: `capsafe submit` follows the job's log through Ray's tail API (never fetching the whole log
again); experiment trackers are Ray Tune's own callbacks, turned on by the spec and refused when not installed.
(The end-to-end run of the own-model spec reads TensorBoard's and MLflow's records back and checks the console
is quiet.)"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from capsafe.cli import follow_job


class FakeJobs:
    def __init__(self) -> None:
        from ray.job_submission import JobStatus

        self.statuses = [JobStatus.RUNNING, JobStatus.SUCCEEDED]

    async def tail_job_logs(self, job_id: str) -> AsyncIterator[str]:
        for chunk in ("line 1\n", "line 2\nline 3\n"):
            yield chunk

    def get_job_status(self, job_id: str):  # noqa: ANN201 - a JobStatus
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    def get_job_logs(self, job_id: str) -> str:
        raise AssertionError("the whole log was fetched; follow it with tail_job_logs")


def test_submit_streams_the_log_once_and_waits_for_the_final_status(capsys: pytest.CaptureFixture[str]) -> None:
    from ray.job_submission import JobStatus

    assert follow_job(FakeJobs(), "raysubmit_1", poll_s=0.01) == JobStatus.SUCCEEDED
    assert capsys.readouterr().out == "line 1\nline 2\nline 3\n"  # each line printed once


def test_trackers_are_ray_tunes_own_callbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.logger import TBXLoggerCallback

    from capsafe.train.sweep import tracking_callbacks

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    assert tracking_callbacks({}, "x") == []
    both = tracking_callbacks({"tensorboard": True, "mlflow_uri": "file:///tmp/mlruns"}, "demo")
    assert [type(c) for c in both] == [TBXLoggerCallback, MLflowLoggerCallback]
    assert both[1].experiment_name == "demo" and both[1].tracking_uri == "file:///tmp/mlruns"
    import os

    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"  # MLflow 3 keeps its folder store behind it


def test_wandb_offline_writes_under_the_results_folder(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    from ray.air.integrations.wandb import WandbLoggerCallback

    from capsafe.train.sweep import tracking_callbacks

    monkeypatch.delenv("WANDB_MODE", raising=False)
    [callback] = tracking_callbacks({"wandb_project": "p", "wandb_mode": "offline"}, "demo", tmp_path)
    assert isinstance(callback, WandbLoggerCallback) and callback.project == "p" and callback.group == "demo"
    assert callback.kwargs == {"mode": "offline", "dir": str((tmp_path / "wandb").resolve())}
    import os

    assert os.environ["WANDB_MODE"] == "offline"  # Ray's callback then asks for no API key


def test_a_tracker_that_is_not_installed_is_refused_by_the_spec(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path) -> None:  # noqa: ANN001
    import importlib.util
    from pathlib import Path

    from capsafe.errors import SpecError
    from capsafe.spec import load_spec

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    demo = Path(__file__).resolve().parent.parent / "jobs" / "demo.yaml"
    with pytest.raises(SpecError, match="pip install mlflow-skinny"):
        load_spec(demo, ["sweep.tracking.mlflow_uri=http://127.0.0.1:5000"])
    assert load_spec(demo, ["sweep.tracking.tensorboard=true"]).sweep.tracking.tensorboard


# One trial's W&B logging actor as Ray runs it (its run() with a queue of results), followed by what Ray does the
# moment run() returns: WandbLoggerCallback kills the actor, and Ray ends the actor's child processes (wandb-core).
# A loaded machine is made deterministic: wandb-core is frozen for a second as it is sent the finish message, as a
# service the scheduler has not run yet would be.
_LOGGING_ACTOR = r"""
import os, signal, sys, threading
import psutil
from ray.air.integrations.wandb import _QueueItem, _WandbLoggingActor
from wandb.sdk.lib.service.service_connection import ServiceConnection
from capsafe.train.wandb_tracker import FlushedWandbLoggingActor

def core_pids():
    return [p.pid for p in psutil.Process().children(recursive=True)]

inform_finish = ServiceConnection.inform_finish
def freeze_then_inform_finish(self, run_id):
    pids = core_pids()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    threading.Timer(1.0, lambda: [os.kill(pid, signal.SIGCONT) for pid in pids]).start()
    inform_finish(self, run_id)
ServiceConnection.inform_finish = freeze_then_inform_finish

class Items:
    def __init__(self, items):
        self.items = list(items)
    def get(self):
        return self.items.pop(0)

folder, which, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
cls = FlushedWandbLoggingActor if which == "capsafe" else _WandbLoggingActor
results = [(_QueueItem.RESULT, {"training_iteration": i, "step": 10 * i, "capability": i / n}) for i in range(1, n + 1)]
actor = cls(logdir=folder, queue=Items(results + [(_QueueItem.END, None)]), exclude=[], to_config=[],
            id="trial0", name="trial0", project="p", mode="offline", dir=folder)
actor.run()
for pid in core_pids():
    os.kill(pid, signal.SIGKILL)
os._exit(0)
"""


def test_every_wandb_record_is_on_disk_when_the_logging_actor_returns(tmp_path: Path) -> None:
    # Ray's own actor returned from run() with its records still buffered in wandb-core, so killing it at once
    # (as WandbLoggerCallback does at the experiment's end) lost them: a W&B run with one point of its curve, or
    # none (issue 22). capsafe's actor returns only once wandb-core has written and closed the run file.
    from wandb_runs import logged_values

    n = 8
    proc = subprocess.run([sys.executable, "-c", _LOGGING_ACTOR, str(tmp_path), "capsafe", str(n)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "WANDB_SILENT": "true", "WANDB_DISABLE_CODE": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    [run_file] = tmp_path.rglob("*.wandb")
    assert [float(v) for v in logged_values(run_file, "capability")] == [i / n for i in range(1, n + 1)]


def test_submit_takes_ray_address_a_runtime_env_file_and_named_variables(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 26: `capsafe submit` honours RAY_ADDRESS as `ray job submit` does, adds a --runtime-env file (pip
    packages, variables) and passes variables by name (--env HF_TOKEN), never their values through a spec."""
    import ray.job_submission

    from capsafe import cli

    seen: dict = {}

    class Client:
        def __init__(self, address: str) -> None:
            seen["address"] = address

        def submit_job(self, entrypoint: str, runtime_env: dict) -> str:
            seen.update(entrypoint=entrypoint, runtime_env=runtime_env)
            return "raysubmit_1"

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Client)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cli.main(["submit", "jobs/demo.yaml", "--no-wait"]) == 2  # no address anywhere: said, not guessed
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    monkeypatch.setenv("HF_TOKEN", "secret-from-the-shell")
    env_file = tmp_path / "env.yaml"
    env_file.write_text("pip: [rich]\nenv_vars: {HF_HOME: /mnt/shared/hf}\nexcludes: [big/]\n")
    assert cli.main(["submit", "jobs/demo.yaml", "--no-wait", "--runtime-env", str(env_file), "--env", "HF_TOKEN",
                     "--overwrite", "seeds=[1]"]) == 0
    assert seen["address"] == "http://head:8265"
    assert seen["entrypoint"] == "python -m capsafe.cli run --overwrite jobs/demo.yaml 'seeds=[1]'"
    env = seen["runtime_env"]
    assert env["pip"] == ["rich"] and env["working_dir"] == str(cli.REPO_ROOT) and "big/" in env["excludes"]
    assert env["env_vars"]["HF_TOKEN"] == "secret-from-the-shell" and env["env_vars"]["HF_HOME"] == "/mnt/shared/hf"
    assert "VLLM_CPU_KVCACHE_SPACE" in env["env_vars"]  # capsafe's own worker variables stay
    assert cli.main(["submit", "jobs/demo.yaml", "--no-wait", "--env", "NOT_SET_ANYWHERE"]) == 2
    env_file.write_text("working_dir: /elsewhere\n")
    assert cli.main(["submit", "jobs/demo.yaml", "--no-wait", "--runtime-env", str(env_file)]) == 2


def test_submit_takes_a_spec_outside_the_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 26 §6: a spec kept outside the project was refused ('copy it into jobs/'); it now travels in the job's
    environment and the job reads it from there. Its relative paths would be read from the project folder on the
    cluster, so they are refused."""
    import ray.job_submission

    from capsafe import cli

    seen: dict = {}

    class Client:
        def __init__(self, address: str) -> None:
            pass

        def submit_job(self, entrypoint: str, runtime_env: dict) -> str:
            seen.update(entrypoint=entrypoint, runtime_env=runtime_env)
            return "raysubmit_2"

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Client)
    spec = tmp_path / "mine.yaml"
    spec.write_text("# my experiment, kept with my notes\nexperiment: mine\nseeds: [0, 1]\n")
    assert cli.main(["submit", str(spec), "--address", "http://head:8265", "--no-wait", "task.target=0.3"]) == 0
    assert seen["entrypoint"] == "python -m capsafe.cli run env:CAPSAFE_SUBMITTED_SPEC task.target=0.3"
    text = seen["runtime_env"]["env_vars"]["CAPSAFE_SUBMITTED_SPEC"]
    assert text == spec.read_text()
    # the job's side: the same command finds the spec in its environment
    monkeypatch.setenv("CAPSAFE_SUBMITTED_SPEC", text)
    assert cli.main(["validate", "env:CAPSAFE_SUBMITTED_SPEC", "task.target=0.3"]) == 0
    monkeypatch.delenv("CAPSAFE_SUBMITTED_SPEC")
    assert cli.main(["validate", "env:CAPSAFE_SUBMITTED_SPEC"]) == 2  # said in one line, no traceback
    # a relative data path in a spec outside the project is refused before anything is submitted
    seen.clear()
    spec.write_text("experiment: mine\nmethods: [{name: safety_mix, data_file: tests/fixtures/suites/generic.jsonl}]\n")
    capsys.readouterr()
    assert cli.main(["submit", str(spec), "--address", "http://head:8265", "--no-wait"]) == 2
    assert "methods.0.data_file=tests/fixtures/suites/generic.jsonl" in capsys.readouterr().err and not seen
