"""Ray Tune over trials (methods x seeds x learning rates); each trial fits a Ray Train TorchTrainer.

Ray 2.60's Train V2 does not accept a trainer as a Tune trainable, so a function trainable builds and
fits the TorchTrainer and ``tune_bridge`` forwards every report to Tune (Ray's own ``TuneReportCallback`` can
deadlock at a trial's end; the module says when). Each TorchTrainer is named
after its trial under one storage folder: Ray Train restarts failed workers from the trial's last resume
checkpoint, and a later run with the same name (``capsafe run --resume``) continues from it too.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ray import tune
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune import CLIReporter

from capsafe.common.capability import stop_reason
from capsafe.common.storage import is_url, join
from capsafe.runtime.capacity import TRIAL_DRIVER_CPUS
from capsafe.train.config import TrialConfig
from capsafe.train.loop import train_loop_per_worker
from capsafe.train.trials import summarize_trial
from capsafe.train.tune_bridge import fit_reporting_to_tune

REPORT_KEYS = ("step", "capability", "loss", "tokens", "elapsed_s", "train_s", "eval_s", "restarts", "stop",
               "candidate", "levels", "kept", "model_dir", "postprocess")
TrialDone = Callable[[TrialConfig, list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]], None]


class TrialRecorder(tune.Callback):
    """Collects each trial's reports, prints one progress line per evaluation, and hands a finished trial's
    rows to ``on_done`` at once, so a driver that dies mid-sweep loses no finished trial.

    Reports are also appended to a journal (``<journal>/<trial id>.jsonl``) as they arrive: a resumed run
    starts from it, so levels decided and steps trained before the driver died stay in the results."""

    def __init__(self, log: Callable[[str], None], on_done: TrialDone, journal: Path) -> None:
        self.log, self.on_done, self.journal = log, on_done, journal
        self.history: dict[str, list[dict[str, Any]]] = {}
        self.started: dict[str, float] = {}
        journal.mkdir(parents=True, exist_ok=True)

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks into the experiment state; ``on_done`` may hold the streaming evaluation
        # (threads, queues). capsafe never restores a Tuner from that state (--resume starts a fresh one).
        return {**self.__dict__, "on_done": None, "log": None}

    def _journal(self, trial: Any) -> Path:
        return self.journal / f"{trial_config(trial.config).trial_id}.jsonl"

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started[trial.trial_id] = time.perf_counter()
        path = self._journal(trial)
        earlier = [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []
        self.history[trial.trial_id] = earlier

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "step" not in result:
            return
        report = {k: result.get(k) for k in REPORT_KEYS}
        self.history.setdefault(trial.trial_id, []).append(report)
        with self._journal(trial).open("a") as fh:
            fh.write(json.dumps(report) + "\n")
        cfg = trial_config(trial.config)
        name, levels = cfg.trial_id, cfg.levels
        candidate = [levels[int(i)] for i in str(result.get("candidate") or "").split(",") if i]
        extra = f", candidate for {', '.join(f'{v:g}' for v in candidate)}" if candidate else ""
        for index, kept in json.loads(str(result.get("kept") or "{}")).items():
            extra += f", level {levels[int(index)]:g} keeps step {kept['step']} ({kept['capability']:.3f})"
        extra += f" -> {result['stop']}" if result.get("stop") else ""
        restarts = f" (restart {result['restarts']})" if result.get("restarts") else ""
        self.log(f"train {name}{restarts}: step {result['step']}, capability {result['capability']:.3f}, "
                 f"loss {result['loss']:.3f}, {result['tokens']} tokens{extra}")

    def _finish(self, trial: Any, error: str | None) -> None:
        cfg = trial_config(trial.config)
        wall = time.perf_counter() - self.started.get(trial.trial_id, time.perf_counter())
        row, checkpoints, trajectory = summarize_trial(cfg, self.history.get(trial.trial_id, []), error, wall)
        self.on_done(cfg, [row], checkpoints, trajectory)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.log(f"train {trial_config(trial.config).trial_id}: failed ({trial.error_file})")
        self._finish(trial, f"see {trial.error_file}")


class CapabilityStopper(tune.Stopper):
    """Stops a trial at the first result whose capability reaches the target itself (not its band's lower
    edge: the in-band candidates before it are kept by the train loop), or that says it must stop (a spent
    budget, a diverged loss). The train loop ends itself on the same rule (``stop_reason``); this keeps Tune's
    view of the trial identical."""

    def __init__(self, target: float) -> None:
        self.target = target

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        if result.get("stop"):
            return True
        return stop_reason(result.get("capability"), self.target, None) == "reached"

    def stop_all(self) -> bool:
        return False


def trial_config(config: dict[str, Any]) -> TrialConfig:
    """The typed trial config of a Tune trial. Tune's parameter space holds its plain-value form: Tune flattens
    it for its trial table and its loggers (``trial/trial_id``, ``trial/lr``, ... in TensorBoard, MLflow and
    W&B); the Ray Train workers get the typed object itself."""
    return TrialConfig.model_validate(config["trial"])


def _run_trial(config: dict[str, Any]) -> None:
    cfg, res = trial_config(config), config["resources"]

    def make_trainer(callbacks: list[Any]) -> TorchTrainer:
        return TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"trial": cfg},
            scaling_config=ScalingConfig(num_workers=res["num_workers"], use_gpu=res["use_gpu"],
                                         resources_per_worker={"CPU": res["cpus_per_worker"]}),
            run_config=RunConfig(name=cfg.trial_id, storage_path=res["storage"],
                                 failure_config=FailureConfig(max_failures=res["max_failures"]),
                                 # model checkpoints live outside Ray's manager; only the latest resume state counts
                                 checkpoint_config=CheckpointConfig(num_to_keep=1),
                                 callbacks=callbacks),
        )

    fit_reporting_to_tune(make_trainer)


def trial_table(every_s: int) -> CLIReporter:
    """Ray Tune's reporter: a table of every trial (capsafe's trial id, Tune's status, the latest step,
    capability, loss and tokens), printed at most every ``every_s`` seconds."""
    return CLIReporter(metric_columns={k: k for k in ("step", "capability", "loss", "tokens")},
                       parameter_columns={"trial/trial_id": "trial"}, max_report_frequency=every_s,
                       sort_by_metric=False)


@contextlib.contextmanager
def _tune_reporter_output() -> Iterator[None]:
    # Ray 2.60's default output engine ignores progress_reporter and prints each trial's whole config;
    # RAY_AIR_NEW_OUTPUT=0 selects the engine that prints the reporter's table. Read when fit() starts.
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["RAY_AIR_NEW_OUTPUT"]
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


def tracking_callbacks(tracking: dict[str, Any], experiment: str, results_dir: Path | None = None) -> list[Any]:
    """Ray Tune's own logger callbacks for the trackers the spec turns on (``sweep.tracking``); offline W&B
    runs go under ``results_dir``/wandb."""
    callbacks: list[Any] = []
    if tracking.get("tensorboard"):
        from ray.tune.logger import TBXLoggerCallback

        callbacks.append(TBXLoggerCallback())
    if tracking.get("mlflow_uri"):
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        if str(tracking["mlflow_uri"]).startswith("file:"):
            # MLflow 3 keeps its folder store only behind this switch; a folder is what works offline
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        callbacks.append(MLflowLoggerCallback(tracking_uri=tracking["mlflow_uri"],
                                              experiment_name=tracking.get("mlflow_experiment") or experiment))
    if tracking.get("wandb_project"):
        from capsafe.train.wandb_tracker import WandbTracker

        kwargs: dict[str, Any] = {}
        if tracking.get("wandb_mode") == "offline":
            os.environ["WANDB_MODE"] = "offline"  # read by Ray's callback: no API key asked for
            kwargs["mode"] = "offline"
            if results_dir is not None:
                (results_dir / "wandb").mkdir(parents=True, exist_ok=True)
                kwargs["dir"] = str((results_dir / "wandb").resolve())
        callbacks.append(WandbTracker(project=tracking["wandb_project"], group=experiment, **kwargs))
    return callbacks


def run_sweep(trials: list[TrialConfig], resources: dict[str, Any], storage: Path | str, name: str,
              max_concurrent: int, log: Callable[[str], None], on_done: TrialDone, journal: Path,
              status_every_s: int = 0, trackers: list[Any] | None = None) -> None:
    """Run all trials; ``on_done(cfg, trial rows, checkpoint rows, trajectory rows)`` as each one ends.
    With ``status_every_s`` Ray Tune's trial table is printed at most that often; ``trackers`` are further
    Tune callbacks (``tracking_callbacks``)."""
    if not trials:
        return
    if isinstance(storage, Path):
        storage.mkdir(parents=True, exist_ok=True)
        storage = str(storage.resolve())
    # else object storage (s3://, gs://): Ray Train and Tune write their state there themselves (pyarrow)
    resources = {**resources, "storage": storage}
    tuner = tune.Tuner(
        tune.with_resources(_run_trial, {"cpu": TRIAL_DRIVER_CPUS}),
        param_space={"trial": tune.grid_search([t.model_dump(mode="json") for t in trials]), "resources": resources},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent),
        # a fresh Tune experiment per run; trial state that must survive lives in the TorchTrainer runs
        run_config=tune.RunConfig(name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                  storage_path=join(storage, "_tune") if is_url(storage) else f"{storage}/_tune",
                                  stop=CapabilityStopper(trials[0].target),
                                  verbose=1 if status_every_s else 0,
                                  progress_reporter=trial_table(status_every_s) if status_every_s else None,
                                  callbacks=[TrialRecorder(log, on_done, journal), *(trackers or [])]),
    )
    started = time.perf_counter()
    with _tune_reporter_output() if status_every_s else contextlib.nullcontext():
        tuner.fit()
    log(f"sweep: {len(trials)} trial(s) finished in {time.perf_counter() - started:.0f} s")
