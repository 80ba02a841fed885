"""The capability ladder and the stopping rules: pure functions shared by the train loop, the Tune stopper and
the stopping-rule simulation (benchmarks/calibration_stopping.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Budget:
    """Caps on one trial; ``None`` means no cap."""

    max_steps: int
    max_tokens: int | None = None
    max_wall_s: float | None = None

    def spent(self, step: int, tokens: int, elapsed_s: float) -> str | None:
        """Which cap is used up ('steps', 'tokens', 'wall_time'), or None while all remain."""
        if step >= self.max_steps:
            return "steps"
        if self.max_tokens is not None and tokens >= self.max_tokens:
            return "tokens"
        if self.max_wall_s is not None and elapsed_s >= self.max_wall_s:
            return "wall_time"
        return None


def stop_reason(capability: float | None, target: float, budget_spent: str | None) -> str | None:
    """Why a trial stops after an evaluation: 'reached' (the selection capability reached the target itself;
    the target is the last rung), 'budget:<cap>', or None to go on. Reaching the target wins over a budget
    spent at the same step. Stopping at the target, not at its band's lower edge: capability rises, so a trial
    stopped at the lower edge sits there, and confirmation noise puts a large share of it below the band."""
    if capability is not None and math.isfinite(capability) and capability >= target - 1e-12:
        return "reached"
    if budget_spent:
        return f"budget:{budget_spent}"
    return None


def in_band(capability: float | None, target: float, tolerance: float) -> bool:
    """Whether a capability lies in the equal-capability band [target - tolerance, target + tolerance]."""
    return capability is not None and math.isfinite(capability) and abs(capability - target) <= tolerance + 1e-12


def new_rungs(levels: list[float]) -> list[dict[str, Any]]:
    """The ladder's state before the first evaluation: per level its in-band candidates and, once decided,
    the kept evaluation. Plain JSON values: it is saved with every resume checkpoint."""
    return [{"level": level, "candidates": [], "kept": None} for level in levels]


def _open(rungs: list[dict[str, Any]]) -> list[int]:
    return [i for i, r in enumerate(rungs) if r["kept"] is None]


def _held(rungs: list[dict[str, Any]]) -> set[int]:
    """Steps of every evaluation the ladder still holds (candidates and kept ones): their models stay on disk."""
    return {c["step"] for r in rungs for c in [*r["candidates"], *([r["kept"]] if r["kept"] else [])]}


def _distance(record: dict[str, Any], level: float) -> tuple[float, int]:
    return abs(record["capability"] - level), record["step"]  # ties: the earlier evaluation


@dataclass(frozen=True)
class Advance:
    """What one evaluation did to the ladder."""

    rungs: list[dict[str, Any]]  # the new state
    save: bool  # the ladder holds this evaluation: save its model (before deleting ``dropped``)
    candidate_for: list[int]  # rung indices this evaluation is an in-band candidate of
    decided: list[int]  # rung indices whose kept evaluation was chosen at this evaluation
    dropped: list[int]  # steps of earlier evaluations no rung holds any more: delete their models
    stop: str | None  # stop_reason of the trial


def advance(rungs: list[dict[str, Any]], record: dict[str, Any], tolerance: float, keep: int,
            budget_spent: str | None) -> Advance:
    """The ladder after one evaluation ``record`` (a dict with at least 'step' and the selection 'capability';
    the rest - model_dir, tokens, ... - travels with it into the state).

    An undecided rung collects the evaluations inside its band as candidates, holding the ``keep`` closest to
    its level; it is decided once capability reaches its level (which covers leaving the band upward too), or
    when the budget runs out, and keeps the candidate closest to its level (ties: the earlier). With no
    candidate, an evaluation that jumps over the whole band is kept (outside the band: the report says so); a
    budget spent with none leaves the rung unreached. The trial stops when the target (the last rung) is
    reached or the budget is spent. ``keep`` never changes the choice (the closest is always held); it bounds
    the models on disk."""
    capability = record["capability"]
    new = [{**r, "candidates": list(r["candidates"])} for r in rungs]
    stop = stop_reason(capability, rungs[-1]["level"], budget_spent) if rungs else None
    finite = math.isfinite(capability)
    candidate_for, decided = [], []
    for i in _open(rungs):
        rung, level = new[i], new[i]["level"]
        if finite and in_band(capability, level, tolerance):
            best = sorted([*rung["candidates"], record], key=lambda c: _distance(c, level))[:keep]
            if any(c is record for c in best):
                candidate_for.append(i)
            rung["candidates"] = best
        if finite and capability >= level - 1e-12:  # reached the level, or left its band upward
            rung["kept"] = rung["candidates"][0] if rung["candidates"] else record
        elif stop and rung["candidates"]:
            rung["kept"] = rung["candidates"][0]
        if rung["kept"] is not None:
            rung["candidates"] = []
            decided.append(i)
    held = _held(new)
    return Advance(new, record["step"] in held, candidate_for, decided, sorted(_held(rungs) - held), stop)


def eval_interval(last: float | None, next_level: float | None, tolerance: float, every: int, every_near: int,
                  margin: float) -> int:
    """Steps until the next capability evaluation: ``every_near`` once the last measured capability is within
    ``margin`` of the next level's band, so that a trial stops soon after it enters the band instead of
    overshooting it by whatever ``every`` steps of training add; ``every`` otherwise."""
    if last is None or next_level is None or not math.isfinite(last):
        return every
    return every_near if last >= next_level - tolerance - margin else every
