"""Turning a spec into trial configs (plain dicts that travel to Ray workers) and trial results into rows."""

from __future__ import annotations

import json
import math
from typing import Any

from capsafe.spec import SafetyMixMethod, Spec


def trial_id(method: str, seed: int, lr: float) -> str:
    return f"{method}-s{seed}-lr{lr:g}"


def plan_trials(spec: Spec, paths: dict[str, str]) -> list[dict[str, Any]]:
    """One config per method x seed x learning rate; ``paths`` maps spec fields to resolved files."""
    trials = []
    for mi, method in enumerate(spec.methods):
        extras = []
        if paths.get("task.general_file") and spec.task.general_fraction > 0:
            extras.append({"name": "general", "path": paths["task.general_file"],
                           "weight": spec.task.general_fraction})
        if isinstance(method, SafetyMixMethod):
            extras.append({"name": "safety", "path": paths[f"methods.{mi}.data_file"], "weight": method.ratio})
        params = method.model_dump(exclude={"name"})
        for seed in spec.seeds:
            for lr in spec.train.learning_rates:
                trials.append({
                    "trial_id": trial_id(method.name, seed, lr), "method": method.name,
                    "method_params": json.dumps(params, sort_keys=True), "seed": seed, "lr": lr,
                    "model_path": paths["model.path"], "prompt_template": spec.model.prompt_template,
                    "mode": spec.train.mode, "lora": spec.train.lora.model_dump(),
                    "zero_stage": spec.train.zero_stage, "batch_size": spec.train.batch_size,
                    "max_steps": spec.train.max_steps, "eval_every": spec.train.eval_every,
                    "max_seq_len": spec.train.max_seq_len, "weight_decay": spec.train.weight_decay,
                    "grad_clip": spec.train.grad_clip, "task_train": paths["task.train_file"],
                    "task_eval": paths["task.eval_file"], "eval_size": spec.task.eval_size,
                    "eval_max_new_tokens": spec.task.max_new_tokens, "eval_batch_size": 128,
                    "metric": spec.task.metric,
                    "torch_threads": max(1, int(spec.train.cpus_per_worker)), "target": spec.task.target,
                    "extra_sources": extras,
                })
    return trials


def summarize_trial(cfg: dict[str, Any], history: list[dict[str, Any]], error: str | None,
                    wall_s: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(trials row, trajectory rows) from the results a trial reported, in order."""
    trajectory = [{"trial_id": cfg["trial_id"], "step": int(h["step"]), "capability": float(h["capability"]),
                   "loss": float(h.get("loss", math.nan)), "elapsed_s": float(h.get("elapsed_s", math.nan))}
                  for h in history if "step" in h]
    # Tune's dataframe fills absent keys with NaN, hence the isinstance checks.
    reached = next((h for h in history
                    if h.get("stop") == "reached" and isinstance(h.get("checkpoint_path"), str)), None)
    finite = [h for h in trajectory if math.isfinite(h["capability"])]
    best = max(finite, key=lambda h: h["capability"], default=None)
    chosen = reached or best or {}
    if reached:
        status = "reached"
    elif error or any(h.get("stop") == "diverged" for h in history):
        status = "failed"
    else:
        status = "not_reached"
    row = {
        "trial_id": cfg["trial_id"], "method": cfg["method"], "seed": cfg["seed"],
        "learning_rate": cfg["lr"], "target": cfg["target"], "reached": reached is not None,
        "capability": float(chosen["capability"]) if chosen else None,
        "step": int(chosen["step"]) if chosen else None, "status": status,
        "checkpoint": reached.get("checkpoint_path") if reached else None, "wall_s": wall_s,
        "method_params": cfg["method_params"],
    }
    return row, trajectory
