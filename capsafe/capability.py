"""The capability ladder and the stopping rules: pure functions shared by the train loop and the Tune stopper."""

from __future__ import annotations

import math
from dataclasses import dataclass


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


def crossed_levels(capability: float, levels: list[float], done: set[float]) -> list[float]:
    """Ladder levels this evaluation reaches for the first time (the checkpoint kept for each is this one)."""
    if not math.isfinite(capability):
        return []
    return [level for level in levels if level not in done and capability >= level]


def stop_reason(capability: float | None, target: float, budget_spent: str | None) -> str | None:
    """Why a trial stops after an evaluation: 'reached' (at/above the target, the last rung), 'budget:<cap>',
    or None to go on. Reaching the target wins over a budget spent at the same step."""
    if capability is not None and math.isfinite(capability) and capability >= target:
        return "reached"
    if budget_spent:
        return f"budget:{budget_spent}"
    return None
