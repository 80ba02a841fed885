"""A Ray Train run inside a Ray Tune trial reports every result to Tune, even when Tune's driver is busy while
the trainer finishes (Ray 2.60's TuneReportCallback deadlocks then: capsafe/train/tune_bridge.py)."""

from __future__ import annotations

import time
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPORTS = 3


def test_every_report_reaches_tune_while_its_driver_is_busy(tmp_path) -> None:
    import ray
    from ray import tune

    # defined here, not at module level: Ray's workers cannot import a test module, nested functions travel
    # by value
    def _loop(config: dict[str, Any]) -> None:
        import ray.train

        for step in range(1, REPORTS + 1):
            ray.train.report({"step": step})

    def _trial(config: dict[str, Any]) -> None:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from capsafe.train.tune_bridge import fit_reporting_to_tune

        def make(callbacks: list) -> TorchTrainer:
            return TorchTrainer(_loop, scaling_config=ScalingConfig(num_workers=1,
                                                                    resources_per_worker={"CPU": 0.5}),
                                run_config=RunConfig(name="bridged", storage_path=config["storage"],
                                                     callbacks=callbacks))

        fit_reporting_to_tune(make)

    class BusyDriver(tune.Callback):
        """Holds Tune's driver on the next-to-last result until the trainer has long finished (capsafe's driver
        is held like this while it starts the evaluation pool or writes a finished trial's results)."""

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            if result.get("step") == REPORTS - 1:
                time.sleep(12)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        tuner = tune.Tuner(
            tune.with_resources(_trial, {"CPU": 0.5}), param_space={"storage": str(tmp_path / "ray")},
            # before the fix the trial hung after its last report: the budget ends the test instead of pytest
            tune_config=tune.TuneConfig(time_budget_s=90),
            run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), callbacks=[BusyDriver()], verbose=0))
        started = time.monotonic()
        results = tuner.fit()
        elapsed = time.monotonic() - started
    finally:
        ray.shutdown()
    result = results[0]
    assert result.error is None, result.error
    steps = result.metrics_dataframe["step"].tolist()
    assert steps == list(range(1, REPORTS + 1)), steps
    assert elapsed < 80, elapsed  # finished, not stopped by the time budget
