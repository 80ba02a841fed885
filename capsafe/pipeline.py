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

from capsafe.errors import SpecError
from capsafe.evaluate import Suite, evaluate_models
from capsafe.formatting import PromptFormat
from capsafe.inputs import load_suites, load_task, materialize_task, resolve_paths
from capsafe.judges import make_judges
from capsafe.metrics import score
from capsafe.ray_shell import ray_session
from capsafe.report import write_report
from capsafe.results import read_table, write_table
from capsafe.spec import Spec
from capsafe.train_model import CHECKPOINT_META
from capsafe.trials import plan_trials

SPEC_SNAPSHOT = "spec.json"


def _logger() -> Callable[[str], None]:
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[capsafe {time.perf_counter() - start:6.0f}s] {msg}", flush=True)

    return log


def model_dir_for(checkpoint: str) -> str:
    """The directory an engine loads for a model checkpoint (LoRA adapters are merged first)."""
    ckpt = Path(checkpoint)
    meta = json.loads((ckpt / CHECKPOINT_META).read_text())
    if meta["kind"] != "lora":
        return str(ckpt / "model")
    merged = ckpt / "merged"
    if not merged.is_dir():
        from peft import AutoPeftModelForCausalLM
        from transformers import AutoTokenizer

        model = AutoPeftModelForCausalLM.from_pretrained(ckpt / "model").merge_and_unload()
        model.save_pretrained(merged)
        AutoTokenizer.from_pretrained(ckpt / "model").save_pretrained(merged)
    return str(merged)


def _prepare_results_dir(spec: Spec, resume: bool) -> Path:
    results_dir = spec.results_dir
    snapshot = json.dumps(spec.model_dump(mode="json"), sort_keys=True, indent=1)
    if resume:
        old = results_dir / SPEC_SNAPSHOT
        if not old.is_file():
            raise SpecError(f"--resume: {results_dir} holds no earlier run of '{spec.experiment}'; drop --resume "
                            "to start one.")
        if old.read_text() != snapshot:
            raise SpecError(f"--resume: the spec differs from the one {results_dir} was run with; resume with the "
                            f"same spec and overrides (saved in {old}), or run without --resume to start over.")
        return results_dir
    if results_dir.exists():
        shutil.rmtree(results_dir)  # a new run replaces the previous one of the same experiment
    results_dir.mkdir(parents=True)
    (results_dir / SPEC_SNAPSHOT).write_text(snapshot)
    return results_dir


def run_experiment(spec: Spec, log: Callable[[str], None] | None = None, resume: bool = False) -> str:
    """Run (or with ``resume`` continue) everything the spec asks for; return the report text."""
    log = log or _logger()
    paths = resolve_paths(spec, log)
    records, suites = load_task(spec, paths), load_suites(spec, paths)  # bad data fails before any write
    results_dir = _prepare_results_dir(spec, resume)
    paths = materialize_task(records, paths, results_dir / "data")
    trials = plan_trials(spec, paths, results_dir / "models")
    done = set(read_table(results_dir, "trials").column("trial_id").to_pylist())
    todo = [t for t in trials if t["trial_id"] not in done]
    skipped = f", {len(trials) - len(todo)} already done" if resume else ""
    ladder = f" (ladder {spec.task.levels()})" if spec.task.ladder else ""
    log(f"experiment {spec.experiment}: {len(trials)} trial(s){skipped}, target {spec.task.metric} >= "
        f"{spec.task.target}{ladder}, results in {results_dir}")

    def record(cfg: dict[str, Any], rows: list[dict], checkpoints: list[dict], trajectory: list[dict]) -> None:
        # trials last: its fragment marks the trial as finished for --resume
        write_table(results_dir, "trajectory", trajectory, fragment=cfg["trial_id"])
        write_table(results_dir, "checkpoints", checkpoints, fragment=cfg["trial_id"])
        write_table(results_dir, "trials", rows, fragment=cfg["trial_id"])
        r = rows[0]
        log(f"trial {r['trial_id']}: {r['status']} ({r['stop_reason']}), capability {r['capability']} at step "
            f"{r['step']}, {r['tokens']} tokens, {r['restarts']} restart(s)")

    need = spec.train.num_workers * spec.train.cpus_per_worker * spec.sweep.max_concurrent_trials + 0.5
    with ray_session(spec.ray_address, need):
        from capsafe.serve_pool import build_pool, start_pool, stop_pool
        from capsafe.sweep import run_sweep

        resources = {"num_workers": spec.train.num_workers, "use_gpu": spec.train.use_gpu,
                     "cpus_per_worker": spec.train.cpus_per_worker, "max_failures": spec.train.max_failures}
        run_sweep(todo, resources, results_dir / "ray", f"{spec.experiment}-sweep",
                  spec.sweep.max_concurrent_trials, log, record, results_dir / "journal")

        app = build_pool(spec.eval.engine, {"max_model_len": spec.eval.max_model_len}, spec.eval.replicas,
                         spec.eval.cpus_per_replica, spec.eval.gpus_per_replica, spec.eval.max_models_per_replica)
        pool_name = f"capsafe-{spec.experiment}"
        log(f"evaluate: starting a pool of {spec.eval.replicas} {spec.eval.engine} replica(s)")
        handle = start_pool(app, pool_name)

        def submit(model_dir: str, prompts: list[str], max_new_tokens: int) -> Any:
            return handle.options(multiplexed_model_id=model_dir).generate.remote(prompts, max_new_tokens)

        fmt, eval_fmt = spec.model.prompt_format(), spec.eval.prompt_format(spec.model)
        tokenizer = _tokenizer(paths["model.path"]) if fmt.chat_template or eval_fmt.chat_template else None
        models = _measure_served_capability(spec, paths, results_dir, fmt, tokenizer, submit, log)
        evaluate_models(models, suites, lambda p: eval_fmt.render(p, tokenizer), spec.eval.max_new_tokens, submit,
                        make_judges(list(spec.eval.judges)), spec.eval.engine, results_dir, log)
        stop_pool(pool_name)
    return write_report(results_dir, spec.experiment)


def _tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def _measure_served_capability(spec: Spec, paths: dict[str, str], results_dir: Path, fmt: PromptFormat,
                               tokenizer: Any, submit: Callable[..., Any],
                               log: Callable[[str], None]) -> dict[tuple[str, int], str]:
    """Capability of the base model and of every kept checkpoint, measured through the evaluation pool on the
    consolidated model; returns the models to evaluate for safety, keyed by (trial, step)."""
    from capsafe.data import read_jsonl

    items = read_jsonl(paths["task.eval_file"], ("prompt", "answer"))[: spec.task.eval_size]
    prompts = [fmt.render(it["prompt"], tokenizer) for it in items]
    answers = [it["answer"] for it in items]

    def measure(model_dir: str) -> float:
        return score(spec.task.metric, submit(model_dir, prompts, spec.task.max_new_tokens).result(), answers)

    models = {("base", 0): paths["model.path"]}
    if "base" not in set(read_table(results_dir, "trials").column("trial_id").to_pylist()):
        capability = measure(paths["model.path"])
        log(f"base model capability: {capability:.3f}")
        write_table(results_dir, "trials", [{
            "trial_id": "base", "method": "base", "seed": None, "learning_rate": None, "target": spec.task.target,
            "reached": capability >= spec.task.target, "capability": capability, "step": 0, "status": "base",
            "stop_reason": "", "checkpoint": paths["model.path"], "tokens": 0, "wall_s": 0.0, "train_s": 0.0,
            "eval_s": 0.0, "restarts": 0, "method_params": "{}"}], fragment="base")
    checkpoints = read_table(results_dir, "checkpoints").to_pylist()
    for trial_id in dict.fromkeys(r["trial_id"] for r in checkpoints):
        rows = [r for r in checkpoints if r["trial_id"] == trial_id]
        served: dict[int, float] = {}
        for r in rows:
            if not r["reached"]:
                continue
            model_dir = model_dir_for(r["checkpoint"])
            models[(trial_id, r["step"])] = model_dir
            if r["served_capability"] is None:
                served.setdefault(r["step"], measure(model_dir))
                r["served_capability"] = served[r["step"]]
                log(f"capability of {trial_id} step {r['step']}: {r['capability']:.3f} in training, "
                    f"{r['served_capability']:.3f} served")
        if served:
            write_table(results_dir, "checkpoints", rows, fragment=trial_id)
    return models


__all__ = ["Suite", "run_experiment", "model_dir_for"]
