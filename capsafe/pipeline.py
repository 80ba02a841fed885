"""The whole experiment: inputs -> sweep -> checkpoints -> safety evaluation -> Parquet -> report.

Each finished trial is written at once (one fragment per table), so ``resume=True`` after a driver crash
skips finished trials, continues unfinished ones from their last resume checkpoint, and evaluates only
what has no results yet: no duplicate rows.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from capsafe.common.data import Suite
from capsafe.common.provenance import write_manifest
from capsafe.common.results import read_table, trial_id, write_table
from capsafe.common.run_guard import (
    LOCK_FILE,
    damaged_fragments,
    holds_results,
    move_aside,
    refuse_to_replace,
    run_lock,
)
from capsafe.common.storage import attach, delete_all, holds_anything, join, pull, push, remote_of
from capsafe.errors import SpecError
from capsafe.evaluate.http_api import api_key_from_env, check_port_free
from capsafe.evaluate.stage import adapter_slots, run_evaluation, serving
from capsafe.preflight import check_eval_context, resolve_train_len
from capsafe.report.build import write_report
from capsafe.run_inputs import (
    answer_labeller,
    check_judge_files,
    load_suites,
    load_task,
    materialize_task,
    prepare_methods,
    resolve_paths,
)
from capsafe.runtime.capacity import check_cluster, local_cpus
from capsafe.runtime.ray_shell import ray_logs_dir, ray_session
from capsafe.spec import Spec
from capsafe.train.config import TrialConfig
from capsafe.train.trials import on_object_storage, plan_trials

SPEC_SNAPSHOT = "spec.json"


def console_logger() -> Callable[[str], None]:
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[capsafe {time.perf_counter() - start:6.0f}s] {msg}", flush=True)

    return log


def _check_resume(spec: Spec) -> None:
    """Refuse ``--resume`` of a run that does not exist or had another spec (before Ray starts)."""
    results_dir = spec.results_dir
    snapshot = json.dumps(spec.model_dump(mode="json"), sort_keys=True, indent=1)
    old = results_dir / SPEC_SNAPSHOT
    if not old.is_file():
        raise SpecError(f"--resume: {results_dir} holds no earlier run of '{spec.experiment}'; drop --resume "
                        "to start one.")
    if old.read_text() != snapshot:
        raise SpecError(f"--resume: the spec differs from the one {results_dir} was run with; resume with the "
                        f"same spec and overrides (saved in {old}), or run without --resume to start over.")


def _prepare_results_dir(spec: Spec, resume: bool, overwrite: bool = False,
                         log: Callable[[str], None] = print) -> Path:
    """The run's results folder, held under the run's lock: on ``resume`` checked (same spec) and its damaged
    fragments moved aside to be recomputed; otherwise new, or emptied of an earlier run only with ``overwrite``."""
    results_dir = spec.results_dir
    snapshot = json.dumps(spec.model_dump(mode="json"), sort_keys=True, indent=1)
    if resume:
        _check_resume(spec)
        damaged = damaged_fragments(results_dir)
        if damaged:
            aside = move_aside(results_dir, damaged)
            log(f"results: {len(damaged)} damaged fragment(s) moved to {aside} (kept, never deleted) and computed "
                "again, with the judgments of any damaged answers: "
                + "; ".join(f"{p.parent.name}/{p.name} ({why})" for p, why in damaged))
        return results_dir
    url = spec.results_url
    if holds_results(results_dir) or (url and holds_anything(url)):
        if not overwrite:  # refused before anything started (run_experiment); checked again under the lock
            refuse_to_replace(results_dir, spec.experiment, None, url)
        for entry in results_dir.iterdir():
            if entry.name != LOCK_FILE:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        if url:
            delete_all(url)
        log(f"results: deleted the earlier run's results in {url or results_dir} (--overwrite)")
    results_dir.mkdir(parents=True, exist_ok=True)
    if url:
        attach(results_dir, url)  # from here on every file written goes up to the object store too
    (results_dir / SPEC_SNAPSHOT).write_text(snapshot)
    return results_dir


def run_experiment(spec: Spec, log: Callable[[str], None] | None = None, resume: bool = False,
                   overwrite: bool = False, spec_path: str | None = None) -> str:
    """Run (or with ``resume`` continue) everything the spec asks for; return the report text. An earlier run's
    results are never replaced without ``overwrite``; ``spec_path`` names the spec in messages."""
    log = log or console_logger()
    if resume and spec.results_url:
        pull(spec.results_url)  # the run's home is the object store: its tables, spec and journal, not its models
    if resume:
        _check_resume(spec)
    elif not overwrite:
        refuse_to_replace(spec.results_dir, spec.experiment, spec_path, spec.results_url)
    paths = resolve_paths(spec, log)
    records, suites = load_task(spec, paths), load_suites(spec, paths)  # bad data fails before any write
    check_judge_files(spec, paths)  # so does a malformed judge check file
    context_len = check_eval_context(spec, paths, records["task.eval_file"], suites, log)  # so do long prompts
    if spec.eval.http is not None:
        check_port_free(spec.eval.http.host, spec.eval.http.port)  # and a port in use
        api_key_from_env(spec.eval.http.api_key_env)  # and an API key the environment does not hold
    beside = spec.eval.schedule == "streaming"  # the pool holds its resources beside training, or after it
    # Connect before anything is written, so that a spec the cluster can never hold is refused with nothing
    # half-done; the stages join this session (ray_session is re-entrant) and it ends with them.
    # one live run per results folder, from here on (a second one is refused; a dead one's lock recovered)
    with run_lock(spec.results_dir, log, spec.results_url), ray_session(spec.ray_address, local_cpus(spec, beside)):
        check_cluster(spec, log, beside)
        try:
            return _run_stages(spec, log, resume, paths, records, suites, context_len, overwrite)
        finally:
            if spec.results_url and remote_of(spec.results_dir):  # whatever ended the run: what it wrote goes up
                push(spec.results_dir)


def unfinished_note(spec: Spec, spec_path: str | None) -> str | None:
    """What a run whose sweep stopped before every trial ended (Ctrl-C: Ray Tune stops its trials and returns,
    and the run reports what it has) says last: the trials with no row yet and the command that continues them;
    None when every trial has one."""
    todo = [trial_id(m.name, s, lr) for m in spec.methods for s in spec.seeds for lr in spec.train.learning_rates]
    done = set(read_table(spec.results_dir, "trials").column("trial_id").to_pylist())
    missing = [t for t in todo if t not in done]
    if not missing:
        return None
    return (f"the sweep stopped before {len(missing)} of {len(todo)} trial(s) ended ({', '.join(missing)}): the "
            "report above is partial, and everything written is kept; continue with: capsafe run --resume "
            f"{spec_path or 'SPEC'}")


def _run_stages(spec: Spec, log: Callable[[str], None], resume: bool, paths: dict[str, str],
                records: dict[str, Any], suites: list[Suite], context_len: int | None, overwrite: bool = False) -> str:
    results_dir = _prepare_results_dir(spec, resume, overwrite, log)
    write_manifest(results_dir, spec.model_dump(mode="json"), paths, "resume" if resume else "run")
    paths = prepare_methods(spec, materialize_task(records, paths, results_dir / "data"), results_dir / "data")
    trials = plan_trials(spec, paths, results_dir / "models")
    trials = resolve_train_len(spec, trials, log)
    url = spec.results_url
    if url:  # workers on any node read the run's data and write its checkpoints through the object store
        trials = on_object_storage(trials, results_dir, url)
        log(f"results: on object storage at {url}, {push(results_dir)} file(s) uploaded so far (working copy "
            f"{results_dir})")
    done = set(read_table(results_dir, "trials").column("trial_id").to_pylist())
    todo = [t for t in trials if t.trial_id not in done]
    skipped = f", {len(trials) - len(todo)} already done" if resume else ""
    ladder = f" (ladder {spec.task.levels()})" if spec.task.ladder else ""
    log(f"experiment {spec.experiment}: {len(trials)} trial(s){skipped}, target {spec.task.metric} >= "
        f"{spec.task.target}{ladder}, results in {results_dir}")
    from capsafe.report.verdicts import plan_floor

    for line in plan_floor(spec)[1]:  # the smallest adjusted p the plan can reach, before anything trains
        log(line)

    finished: list[str] = []
    sweep_start = time.perf_counter()

    def record(cfg: TrialConfig, rows: list[dict], checkpoints: list[dict], trajectory: list[dict]) -> None:
        # trials last: its fragment marks the trial as finished for --resume
        write_table(results_dir, "trajectory", trajectory, fragment=cfg.trial_id)
        write_table(results_dir, "checkpoints", checkpoints, fragment=cfg.trial_id)
        write_table(results_dir, "trials", rows, fragment=cfg.trial_id)
        push(results_dir)  # the journal and trackers' files too (tables went up as they were written)
        r = rows[0]
        finished.append(r["trial_id"])
        left = len(todo) - len(finished)
        eta = (time.perf_counter() - sweep_start) / len(finished) * left
        log(f"trial {r['trial_id']}: {r['status']} ({r['stop_reason']}), capability {r['capability']} at step "
            f"{r['step']}, {r['tokens']} tokens, {r['restarts']} restart(s) — [{len(finished)}/{len(todo)} trials "
            f"done{f', ~{eta:.0f} s to go' if left else ''}]")

    streaming = spec.eval.schedule == "streaming"
    with ray_session(spec.ray_address, local_cpus(spec, streaming)):  # joins run_experiment's session
        logs = ray_logs_dir()
        if logs:
            log(f"workers', Serve's and vLLM's output: {logs} (CAPSAFE_WORKER_LOGS=1 shows it here too)")
        from capsafe.train.sweep import run_sweep, tracking_callbacks

        resources = {"num_workers": spec.train.num_workers, "use_gpu": spec.train.use_gpu,
                     "cpus_per_worker": spec.train.cpus_per_worker, "max_failures": spec.train.max_failures}

        def sweep(on_done: Callable[[str], None] | None = None) -> None:
            def recorded(cfg: TrialConfig, rows: list[dict], checkpoints: list[dict],
                         trajectory: list[dict]) -> None:
                record(cfg, rows, checkpoints, trajectory)
                if on_done:
                    on_done(cfg.trial_id)

            run_sweep(todo, resources, join(url, "ray") if url else results_dir / "ray", f"{spec.experiment}-sweep",
                      spec.sweep.max_concurrent_trials, log, recorded, results_dir / "journal",
                      spec.sweep.status_every_s, tracking_callbacks(spec.sweep.tracking.model_dump(), spec.experiment,
                                                                    results_dir))

        if streaming:
            from capsafe.evaluate.stream import StreamingEvaluation

            slots = adapter_slots(spec, None, len(trials))
            with serving(spec, paths, results_dir, suites, log, context_len, slots, answer_labeller(spec)) as run, \
                    StreamingEvaluation(run, log) as stream:
                for trial in ["base", *sorted(done)]:  # the base model, and on --resume the trials already trained
                    stream.submit(trial)
                sweep(stream.submit)
                log("evaluate: the sweep is done; waiting for the evaluation of its last trials")
        else:
            sweep()
            run_evaluation(spec, paths, results_dir, suites, log, context_len, answer_labeller(spec))
    report = write_report(results_dir, spec.experiment)
    if url:
        log(f"results: {push(results_dir)} more file(s) uploaded to {url}")
    return report

