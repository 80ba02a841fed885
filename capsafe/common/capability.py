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


def crossed_levels(capability: float, levels: list[float], done: set[float], tolerance: float = 0.0) -> list[float]:
    """Ladder levels this evaluation reaches for the first time - at or above ``level - tolerance``, the lower
    edge of the level's band (the checkpoint kept for each is this one)."""
    if not math.isfinite(capability):
        return []
    return [level for level in levels if level not in done and capability >= level - tolerance - 1e-12]


def stop_reason(capability: float | None, target: float, budget_spent: str | None,
                tolerance: float = 0.0) -> str | None:
    """Why a trial stops after an evaluation: 'reached' (in or above the target's band, i.e. at or above
    ``target - tolerance``; the target is the last rung), 'budget:<cap>', or None to go on. Reaching the target
    wins over a budget spent at the same step."""
    if capability is not None and math.isfinite(capability) and capability >= target - tolerance - 1e-12:
        return "reached"
    if budget_spent:
        return f"budget:{budget_spent}"
    return None


def in_band(capability: float | None, target: float, tolerance: float) -> bool:
    """Whether a capability lies in the equal-capability band [target - tolerance, target + tolerance]."""
    return capability is not None and math.isfinite(capability) and abs(capability - target) <= tolerance + 1e-12


def eval_interval(last: float | None, next_level: float | None, tolerance: float, every: int, every_near: int,
                  margin: float) -> int:
    """Steps until the next capability evaluation: ``every_near`` once the last measured capability is within
    ``margin`` of the next level's band, so that a trial stops soon after it enters the band instead of
    overshooting it by whatever ``every`` steps of training add; ``every`` otherwise."""
    if last is None or next_level is None or not math.isfinite(last):
        return every
    return every_near if last >= next_level - tolerance - margin else every
