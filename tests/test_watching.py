"""Watching a run: `capsafe submit` follows the job's log through Ray's tail API (never fetching the whole log
again); experiment trackers are Ray Tune's own callbacks, turned on by the spec and refused when not installed.
(The end-to-end micro run reads TensorBoard's and MLflow's records back and checks the console is quiet.)"""

from __future__ import annotations

from collections.abc import AsyncIterator

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
