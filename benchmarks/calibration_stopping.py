"""Calibration of the stopping rule (issue 23): where do trials stop, and how many confirmed capabilities land in
the equal-capability band?

Simulated trials, known truth: each trial's true capability follows a logistic learning curve
``ceiling / (1 + exp(-(step - midpoint) / scale))`` with ceiling, midpoint and scale drawn per trial. Every
evaluation scores the selection split as Binomial(eval_size, true) / eval_size - independent draws, i.e. an
item set large enough that its own sampling error does not repeat from one evaluation to the next (a fixed
set's errors do partly repeat, which makes successive evaluations agree more than this). The evaluation cadence
is capsafe's own ``eval_interval``; the kept checkpoint's confirmed capability is Binomial(confirm_size, true)
/ confirm_size.

Two rules are compared:
- ``first``: the rule before issue 23, stop at the first evaluation at or above ``target - tolerance`` and keep
  it (written out here, as it no longer exists in capsafe);
- ``closest``: capsafe's rule, ``capsafe.common.capability.advance`` (candidates in the band, stop at the target,
  keep the candidate closest to it).

Reported per setting: bias = mean(true capability at the kept checkpoint) - target with its Monte Carlo standard
error; the share of confirmed capabilities inside [target - tolerance, target + tolerance], below and above it;
the share kept outside the band on the selection split (a jump over the whole band); evaluations per trial.

    python benchmarks/calibration_stopping.py            # the table at the demo's and capsafe's defaults
    python benchmarks/calibration_stopping.py --trials 4000 --grid   # plus the grid the defaults were chosen from
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from capsafe.common.capability import advance, eval_interval, in_band, new_rungs


@dataclass(frozen=True)
class Setting:
    """One simulated configuration (the demo's task and cadence unless changed)."""

    rule: str = "closest"  # 'first' (before issue 23) or 'closest' (capsafe's)
    eval_size: int = 400
    confirm_size: int = 500
    target: float = 0.4
    tolerance: float = 0.05
    every: int = 25
    every_near: int = 12
    near_margin: float = 0.15
    keep: int = 1
    max_steps: int = 2000


def _curve(rng: np.random.Generator) -> tuple[float, float, float]:
    # ceiling, midpoint, scale: the demo's arms reached 0.4 in ~150-700 steps at 25-step evaluations, with
    # between ~40 and ~200 steps spent inside a 0.1-wide band
    return float(rng.uniform(0.55, 0.95)), float(rng.uniform(150.0, 600.0)), float(rng.uniform(25.0, 120.0))


def _true(curve: tuple[float, float, float], step: int) -> float:
    ceiling, mid, scale = curve
    return ceiling / (1.0 + math.exp(-(step - mid) / scale))


def _trial(s: Setting, curve: tuple[float, float, float], rng: np.random.Generator) -> tuple[int | None, int, bool]:
    """(step of the kept checkpoint or None, evaluations, kept outside the band on the selection split)."""
    rungs, last, step, last_eval, evals = new_rungs([s.target]), None, 0, 0, 0
    while True:
        step += 1
        spent = "steps" if step >= s.max_steps else None
        upcoming = s.target if rungs[-1]["kept"] is None else None
        if step - last_eval < eval_interval(last, upcoming, s.tolerance, s.every, s.every_near, s.near_margin) \
                and not spent:
            continue
        evals, last_eval = evals + 1, step
        last = float(rng.binomial(s.eval_size, _true(curve, step))) / s.eval_size
        if s.rule == "first":
            if last >= s.target - s.tolerance - 1e-12:
                return step, evals, not in_band(last, s.target, s.tolerance)
            if spent:
                return None, evals, False
            continue
        result = advance(rungs, {"step": step, "capability": last}, s.tolerance, s.keep, spent)
        rungs = result.rungs
        if result.stop:
            kept = rungs[-1]["kept"]
            if kept is None:
                return None, evals, False
            return kept["step"], evals, not in_band(kept["capability"], s.target, s.tolerance)


def simulate(s: Setting, trials: int, seed: int = 0) -> dict[str, Any]:
    """One row of figures for setting ``s`` over ``trials`` simulated trials."""
    rng = np.random.default_rng(seed)
    true, confirmed, evals, outside = [], [], [], 0
    for _ in range(trials):
        curve = _curve(rng)
        step, n, out = _trial(s, curve, rng)
        evals.append(n)
        if step is None:
            continue
        p = _true(curve, step)
        true.append(p)
        confirmed.append(rng.binomial(s.confirm_size, p) / s.confirm_size)
        outside += out
    t, c = np.array(true), np.array(confirmed)
    lo, hi = s.target - s.tolerance - 1e-12, s.target + s.tolerance + 1e-12
    return {"rule": s.rule, "eval_size": s.eval_size, "confirm_size": s.confirm_size, "every": s.every,
            "every_near": s.every_near, "near_margin": s.near_margin, "keep": s.keep, "trials": trials,
            "reached": len(t) / trials, "bias": float(t.mean() - s.target),
            "bias_se": float(t.std(ddof=1) / math.sqrt(len(t))), "true_sd": float(t.std(ddof=1)),
            "in_band": float(((c >= lo) & (c <= hi)).mean()), "below": float((c < lo).mean()),
            "above": float((c > hi).mean()), "kept_outside": outside / max(1, len(t)),
            "evals": float(np.mean(evals))}


def stopping_rows(trials: int = 2000, seed: int = 0, grid: bool = False) -> list[dict[str, Any]]:
    """The stopping rule's calibration rows: both rules at the demo's old settings (200 selection / 300
    confirmation items, evaluation every 25 steps, every 5 near the band), both at capsafe's defaults (400 / 500,
    every 25, every 12 near the band), and with ``grid`` the settings the defaults were chosen from."""
    old = {"eval_size": 200, "confirm_size": 300, "every_near": 5}
    settings = [Setting("first", **old), Setting("closest", **old), Setting("first"), Setting("closest")]
    if grid:
        settings += [Setting("closest", n, m) for n, m in ((200, 300), (300, 500), (400, 400), (600, 500))]
        settings += [Setting("closest", every_near=near) for near in (5, 8, 10, 25)]
        settings += [Setting("closest", near_margin=0.05), Setting("closest", near_margin=0.3),
                     Setting("closest", keep=3)]
    return [simulate(s, trials, seed) for s in settings]


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| rule | selection | confirmation | every / near | bias of true capability (± MC s.e.) | true s.d. "
            "| confirmed in band | below | above | kept outside | evaluations |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        lines.append(f"| {r['rule']} | {r['eval_size']} | {r['confirm_size']} | {r['every']} / {r['every_near']} "
                     f"(margin {r['near_margin']:g}{', keep ' + str(r['keep']) if r['keep'] != 1 else ''}) "
                     f"| {r['bias']:+.4f} ± {r['bias_se']:.4f} | {r['true_sd']:.4f} | {r['in_band']:.1%} "
                     f"| {r['below']:.1%} | {r['above']:.1%} | {r['kept_outside']:.1%} | {r['evals']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", action="store_true", help="also the settings the defaults were chosen from")
    args = parser.parse_args()
    print(markdown(stopping_rows(args.trials, args.seed, args.grid)))


if __name__ == "__main__":
    main()
