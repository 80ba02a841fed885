"""Capability scoring and the stopping rule: pure functions, shared by the train loop and the Tune stopper."""

from __future__ import annotations

from capsafe.formatting import normalize_answer


def exact_match(predictions: list[str], answers: list[str]) -> float:
    """Share of predictions equal to their answer after normalisation."""
    if not answers:
        return 0.0
    hits = sum(normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers, strict=True))
    return hits / len(answers)


METRICS = {"exact_match": exact_match}


def stop_reason(capability: float | None, step: int, target: float, max_steps: int) -> str | None:
    """Why a trial should stop now: 'reached' (capability at/above target), 'budget', or None (go on)."""
    if capability is not None and capability >= target:
        return "reached"
    if step >= max_steps:
        return "budget"
    return None
