"""Turning a spec into trial configs (``TrialConfig``, typed, sent to Ray workers) and trial results into rows."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from capsafe.common.results import trial_id
from capsafe.common.storage import localize, to_url
from capsafe.spec import Spec
from capsafe.train.config import SourceFile, TrialConfig


def method_paths(paths: dict[str, str], index: int) -> dict[str, str]:
    """``{field: path}`` of method ``index`` (its resolved data fields), as its hooks take them."""
    prefix = f"methods.{index}."
    return {k.removeprefix(prefix): v for k, v in paths.items() if k.startswith(prefix)}


def plan_trials(spec: Spec, paths: dict[str, str], checkpoints_dir: Path) -> list[TrialConfig]:
    """One config per method x seed x learning rate; ``paths`` maps spec fields to resolved files (the task
    files already materialised as jsonl with 'prompt' and 'answer')."""
    trials = []
    for mi, method in enumerate(spec.methods):
        extras = []
        if method.mixes_general and paths.get("task.general_file") and spec.task.general_fraction > 0:
            extras.append({"name": "general", "path": paths["task.general_file"],
                           "weight": spec.task.general_fraction})
        mine = method_paths(paths, mi)
        extras += method.task_sources(mine)
        params = method.model_dump(exclude={"name"})
        for seed in spec.seeds:
            for lr in spec.train.learning_rates:
                tid = trial_id(method.name, seed, lr)
                trials.append(TrialConfig(
                    trial_id=tid, method=method.name, method_params=json.dumps(params, sort_keys=True),
                    seed=seed, lr=lr, model_path=paths["model.path"],
                    prompt_format=method.train_format(spec.model.prompt_format()),
                    train=spec.train.model_copy(deep=True), method_paths=mine,
                    alignment_sources=tuple(SourceFile(**x) for x in method.alignment_sources(mine)),
                    task_train=paths["task.train_file"], task_eval=paths["task.eval_file"],
                    eval_size=spec.task.eval_size, eval_max_new_tokens=spec.task.max_new_tokens,
                    eval_batch_size=spec.task.eval_batch_size, metric=spec.task.metric,
                    levels=tuple(spec.task.levels()), target=spec.task.target, tolerance=spec.task.tolerance,
                    torch_threads=max(1, int(spec.train.cpus_per_worker)),
                    extra_sources=tuple(SourceFile(**x) for x in extras),
                    checkpoint_dir=str((checkpoints_dir / tid).resolve()),
                ))
    return trials


def on_object_storage(trials: list[TrialConfig], local_root: Path, url: str) -> list[TrialConfig]:
    """The trials of a run whose results live at ``url`` (``local_root`` its working copy): the data files the
    run wrote there and the checkpoints' destination named by URL, so workers on any node find them."""

    def remote(path: str) -> str:
        return to_url(path, local_root, url)

    def sources(entries: tuple[SourceFile, ...]) -> tuple[SourceFile, ...]:
        return tuple(e.model_copy(update={"path": remote(e.path)}) for e in entries)

    return [t.model_copy(update={
        "task_train": remote(t.task_train), "task_eval": remote(t.task_eval),
        "extra_sources": sources(t.extra_sources), "alignment_sources": sources(t.alignment_sources),
        "method_paths": {k: remote(v) for k, v in t.method_paths.items()},
        "checkpoint_url": remote(t.checkpoint_dir)}) for t in trials]


def localized(cfg: TrialConfig) -> TrialConfig:
    """``cfg`` with every data file named by URL copied to this node (a worker's first act)."""

    def sources(entries: tuple[SourceFile, ...]) -> tuple[SourceFile, ...]:
        return tuple(e.model_copy(update={"path": localize(e.path)}) for e in entries)

    return cfg.model_copy(update={
        "task_train": localize(cfg.task_train), "task_eval": localize(cfg.task_eval),
        "extra_sources": sources(cfg.extra_sources), "alignment_sources": sources(cfg.alignment_sources),
        "method_paths": {k: localize(v) for k, v in cfg.method_paths.items()}})


def _checkpoint(cfg: TrialConfig, model_dir: str) -> str:
    """A kept checkpoint as the tables name it: its folder, or with object storage its URL."""
    if cfg.checkpoint_url is None:
        return model_dir
    return to_url(model_dir, Path(cfg.checkpoint_dir), cfg.checkpoint_url)


def summarize_trial(cfg: TrialConfig, history: list[dict[str, Any]], error: str | None,
                    wall_s: float) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """(trials row, checkpoints rows, trajectory rows) from the results a trial reported, in order."""
    reports = [h for h in history if "step" in h and isinstance(h.get("stop"), str)]
    trajectory = [{"trial_id": cfg.trial_id, "step": int(h["step"]), "capability": float(h["capability"]),
                   "loss": float(h.get("loss", math.nan)), "tokens": int(h.get("tokens", 0)),
                   "elapsed_s": float(h.get("elapsed_s", math.nan)), "restarts": int(h.get("restarts", 0))}
                  for h in reports]
    kept: dict[float, dict[str, Any]] = {}
    for h in reports:  # after a restart a level may be decided again: the surviving run's decision counts
        for index, record in json.loads(str(h.get("kept") or "{}")).items():
            kept[cfg.levels[int(index)]] = record  # named by index, never by a rounded number
    checkpoints = []
    for level in cfg.levels:
        at = kept.get(level)  # the candidate closest to the level (capsafe.common.capability.advance)
        checkpoints.append({
            "trial_id": cfg.trial_id, "level": level, "reached": at is not None,
            "step": int(at["step"]) if at else None, "capability": float(at["capability"]) if at else None,
            "tokens": int(at["tokens"]) if at else None, "elapsed_s": float(at["elapsed_s"]) if at else None,
            "checkpoint": _checkpoint(cfg, str(at["model_dir"])) if at else None, "served_capability": None,
            "confirmed_capability": None, "confirmed_items": None,
            "postprocess": str(at.get("postprocess") or "") or None if at else None, "evaluation_started_at": None})
    at_target = kept.get(cfg.target)
    finite = [h for h in reports if math.isfinite(float(h["capability"]))]
    best = max(finite, key=lambda h: float(h["capability"]), default=None)
    chosen: dict[str, Any] | None = at_target or best
    last = reports[-1] if reports else {}
    stop = str(last.get("stop") or "")
    if at_target:
        status = "reached"
    elif stop == "diverged":
        status = "diverged"
    elif error or not stop:
        status = "failed"  # an error, or the trial ended without saying why (e.g. its workers gave up)
    else:
        status = "not_reached"
    row = {
        "trial_id": cfg.trial_id, "method": cfg.method, "seed": cfg.seed, "learning_rate": cfg.lr,
        "target": cfg.target, "tolerance": cfg.tolerance, "reached": at_target is not None,
        "capability": float(chosen["capability"]) if chosen else None, "confirmed_capability": None,
        "step": int(chosen["step"]) if chosen else None, "status": status,
        "stop_reason": stop or (f"error: {error.splitlines()[0][:200]}" if error else ""),
        "checkpoint": _checkpoint(cfg, str(at_target["model_dir"])) if at_target else None,
        "tokens": int(last["tokens"]) if last else None, "wall_s": wall_s,
        "train_s": float(last["train_s"]) if last else None, "eval_s": float(last["eval_s"]) if last else None,
        "restarts": int(last.get("restarts", 0)) if last else 0, "method_params": cfg.method_params,
        "finished_at": datetime.now(UTC),
    }
    return row, checkpoints, trajectory
