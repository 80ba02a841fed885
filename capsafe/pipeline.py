"""The whole experiment: world -> sweep -> checkpoints -> safety evaluation -> Parquet -> report."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from capsafe.capability import METRICS
from capsafe.data import read_jsonl
from capsafe.evaluate import Suite, evaluate_models
from capsafe.formatting import render_prompt
from capsafe.judges import make_judges
from capsafe.ray_shell import cache_root, ray_session
from capsafe.report import write_report
from capsafe.results import write_table
from capsafe.spec import DEMO, Spec
from capsafe.train_loop import CHECKPOINT_META
from capsafe.trials import plan_trials


def _logger() -> Callable[[str], None]:
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[capsafe {time.perf_counter() - start:6.0f}s] {msg}", flush=True)

    return log


def resolve_paths(spec: Spec, log: Callable[[str], None]) -> dict[str, str]:
    """Spec data fields -> real paths, building (or reusing) the demo world where a field says 'demo'."""
    paths = spec.data_paths()
    if not spec.uses_demo_world():
        return paths
    from capsafe.world import build_world

    world = build_world(spec.world, cache_root() / "worlds", log=log)
    demo = {"model.path": world.model_dir, "task.train_file": world.task_train, "task.eval_file": world.task_eval,
            "task.general_file": world.general}
    resolved = {}
    for field, value in paths.items():
        if value != DEMO:
            resolved[field] = value
        elif field in demo:
            resolved[field] = str(demo[field])
        elif field.endswith(".data_file"):
            resolved[field] = str(world.safety)
        else:  # eval.suites.<i>.file
            name = spec.eval.suites[int(field.split(".")[2])].name
            resolved[field] = str(world.suites[name])
    return resolved


def model_dir_for(checkpoint: str) -> str:
    """The directory an engine loads for a reported checkpoint (LoRA adapters are merged first)."""
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


def load_suites(spec: Spec, paths: dict[str, str]) -> list[Suite]:
    suites = []
    for i, s in enumerate(spec.eval.suites):
        items = read_jsonl(paths[f"eval.suites.{i}.file"], ("prompt",))
        for n, it in enumerate(items):
            it.setdefault("id", f"{s.name}-{n}")
        suites.append(Suite(s.name, s.kind, items[: spec.eval.max_prompts_per_suite]))
    return suites


def run_experiment(spec: Spec, log: Callable[[str], None] | None = None) -> str:
    """Run everything the spec asks for; return the report text."""
    log = log or _logger()
    paths = resolve_paths(spec, log)
    suites = load_suites(spec, paths)
    trials = plan_trials(spec, paths)
    results_dir = spec.results_dir
    if results_dir.exists():
        shutil.rmtree(results_dir)  # a new run replaces the previous one of the same experiment
    results_dir.mkdir(parents=True)
    log(f"experiment {spec.experiment}: {len(trials)} trial(s), target {spec.task.metric} >= {spec.task.target}, "
        f"results in {results_dir}")
    need = spec.train.num_workers * spec.train.cpus_per_worker * spec.sweep.max_concurrent_trials + 0.5
    with ray_session(spec.ray_address, need):
        from capsafe.serve_pool import build_pool, start_pool, stop_pool
        from capsafe.sweep import run_sweep

        resources = {"num_workers": spec.train.num_workers, "use_gpu": spec.train.use_gpu,
                     "cpus_per_worker": spec.train.cpus_per_worker}
        rows, trajectory = run_sweep(trials, resources, (results_dir / "checkpoints"), f"{spec.experiment}-sweep",
                                     spec.sweep.max_concurrent_trials, log)
        for r in rows:
            log(f"trial {r['trial_id']}: {r['status']}, capability {r['capability']} at step {r['step']}")
        write_table(results_dir, "trajectory", trajectory)

        app = build_pool(spec.eval.engine, {"max_model_len": spec.eval.max_model_len}, spec.eval.replicas,
                         spec.eval.cpus_per_replica, spec.eval.gpus_per_replica, spec.eval.max_models_per_replica)
        pool_name = f"capsafe-{spec.experiment}"
        log(f"evaluate: starting a pool of {spec.eval.replicas} {spec.eval.engine} replica(s)")
        handle = start_pool(app, pool_name)

        def submit(model_dir: str, prompts: list[str], max_new_tokens: int) -> Any:
            return handle.options(multiplexed_model_id=model_dir).generate.remote(prompts, max_new_tokens)

        base_row = _evaluate_base_capability(spec, paths, submit, log)
        write_table(results_dir, "trials", [base_row, *rows])
        models = {"base": paths["model.path"]}
        models.update({r["trial_id"]: model_dir_for(r["checkpoint"]) for r in rows if r["reached"]})
        evaluate_models(models, suites, spec.model.prompt_template, spec.eval.max_new_tokens, submit,
                        make_judges(list(spec.eval.judges)), spec.eval.engine, results_dir, log)
        stop_pool(pool_name)
    return write_report(results_dir, spec.experiment)


def _evaluate_base_capability(spec: Spec, paths: dict[str, str], submit: Callable[..., Any],
                              log: Callable[[str], None]) -> dict[str, Any]:
    """The base model's own capability, measured through the same pool, as the reference row."""
    items = read_jsonl(paths["task.eval_file"], ("prompt", "answer"))[: spec.task.eval_size]
    prompts = [render_prompt(spec.model.prompt_template, it["prompt"]) for it in items]
    preds = submit(paths["model.path"], prompts, spec.task.max_new_tokens).result()
    capability = METRICS[spec.task.metric](preds, [it["answer"] for it in items])
    log(f"base model capability: {capability:.3f}")
    return {"trial_id": "base", "method": "base", "seed": None, "learning_rate": None,
            "target": spec.task.target, "reached": capability >= spec.task.target, "capability": capability,
            "step": 0, "status": "base", "checkpoint": paths["model.path"], "wall_s": 0.0,
            "method_params": "{}"}
