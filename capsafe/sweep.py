"""Ray Tune over trials (methods x seeds x learning rates); each trial fits a Ray Train TorchTrainer.

Ray 2.60's Train V2 does not accept a trainer as a Tune trainable, so a function trainable builds and
fits the TorchTrainer and ``TuneReportCallback`` forwards every report (and checkpoint path) to Tune.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import tune
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from capsafe.capability import stop_reason
from capsafe.train_loop import train_loop_per_worker
from capsafe.trials import summarize_trial


class ProgressLog(tune.Callback):
    """One line per reported evaluation, in place of Tune's wide status tables."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "step" not in result:
            return
        name = trial.config["trial"]["trial_id"]
        stop = f" -> {result['stop']}" if result.get("stop") else ""
        self.log(f"train {name}: step {result['step']}, capability {result['capability']:.3f}, "
                 f"loss {result['loss']:.3f}{stop}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.log(f"train {trial.config['trial']['trial_id']}: failed ({trial.error_file})")


class CapabilityStopper(tune.Stopper):
    """Stops a trial at the first result whose capability reaches the target, or when its budget is spent."""

    def __init__(self, target: float, max_steps: int) -> None:
        self.target, self.max_steps = target, max_steps

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        if result.get("stop") == "diverged":
            return True
        step = result.get("step")
        if step is None:
            return False
        return stop_reason(result.get("capability"), int(step), self.target, self.max_steps) is not None

    def stop_all(self) -> bool:
        return False


def _run_trial(config: dict[str, Any]) -> None:
    cfg, res = config["trial"], config["resources"]
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=res["num_workers"], use_gpu=res["use_gpu"],
                                     resources_per_worker={"CPU": res["cpus_per_worker"]}),
        run_config=RunConfig(name=cfg["trial_id"], storage_path=res["storage"],
                             callbacks=[TuneReportCallback()]),  # type: ignore[list-item]
    )
    trainer.fit()


def run_sweep(trials: list[dict[str, Any]], resources: dict[str, Any], storage: Path, name: str,
              max_concurrent: int, log: Callable[[str], None]) -> tuple[list[dict], list[dict]]:
    """Run all trials; return (trials rows, trajectory rows) in plan order."""
    target, max_steps = trials[0]["target"], trials[0]["max_steps"]
    storage.mkdir(parents=True, exist_ok=True)
    resources = {**resources, "storage": str(storage.resolve())}
    tuner = tune.Tuner(
        tune.with_resources(_run_trial, {"cpu": 0.1}),
        param_space={"trial": tune.grid_search(trials), "resources": resources},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(name=name, storage_path=str(storage.resolve()),
                                  stop=CapabilityStopper(target, max_steps), verbose=0,
                                  callbacks=[ProgressLog(log)]),
    )
    started = time.perf_counter()
    grid = tuner.fit()
    log(f"sweep: {len(trials)} trial(s) finished in {time.perf_counter() - started:.0f} s")
    by_id = {}
    for result in grid:  # type: ignore[attr-defined]
        cfg = result.config["trial"]
        df = result.metrics_dataframe
        history = df.to_dict("records") if df is not None else []
        wall = float(df["time_total_s"].iloc[-1]) if df is not None and "time_total_s" in df else 0.0
        by_id[cfg["trial_id"]] = summarize_trial(cfg, history, str(result.error) if result.error else None, wall)
    rows, trajectory = [], []
    for cfg in trials:
        row, traj = by_id[cfg["trial_id"]]
        rows.append(row)
        trajectory.extend(traj)
    return rows, trajectory
