"""Calibration of the report's statistics on simulated results with known truth (issue 23): the coverage of every
interval the report prints, the false-positive rate of every test and of the Holm-adjusted family, and power.

The data are capsafe's own shape: checkpoints (seeds) x the same prompts (crossed), each response a 0/1 verdict
drawn as Bernoulli(expit(mu + seed effect + prompt difficulty + seed x prompt)) and flipped with the judge's
noise. The report's own functions run on them, never copies: ``nested_interval`` (every rate cell),
``compare`` (every comparison's interval and test), ``holm`` and ``detectable_difference``; the family row runs
``tables.comparison_records`` on a simulated judgments table, the whole path the report takes. The truth an
interval must cover is the expected verdict rate over the population the report says it generalises to: prompts
like these for one checkpoint, seeds and prompts like these for several.

    python benchmarks/calibration.py                   # the full table (benchmarks/RESULTS.md)
    python benchmarks/calibration.py --reps 100 --quick
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import expit

from capsafe.report.stats import ALPHA, compare, holm, nested_interval
from capsafe.report.verdicts import detectable_difference

sys.path.insert(0, str(Path(__file__).parent))  # run as a script or imported by the tests: its neighbour
import calibration_stopping  # noqa: E402


@dataclass(frozen=True)
class World:
    """One simulated setting: logit-scale mean, spreads of seed effects, prompt difficulty and seed x prompt
    interaction, the judge's flip rate, and the method's effect (logit) over the reference."""

    mu: float = 0.0
    seed_sd: float = 0.3
    prompt_sd: float = 1.0
    cross_sd: float = 0.3
    noise: float = 0.05
    effect: float = 0.0
    repeats: int = 1  # generations per prompt, averaged into the prompt's value as the report does

    def rate(self, logit: Any) -> Any:
        return self.noise + (1 - 2 * self.noise) * expit(logit)


def _population(world: World, shift: float, seed_effect: float | None, draws: int = 4000) -> float:
    """The expected verdict rate over prompts like these (and over seeds when ``seed_effect`` is None)."""
    rng = np.random.default_rng(12345)
    prompts = rng.normal(0, world.prompt_sd, draws)
    cross = rng.normal(0, world.cross_sd, draws)
    seeds = rng.normal(0, world.seed_sd, (draws, 1)) if seed_effect is None else np.array([[seed_effect]])
    return float(world.rate(world.mu + shift + seeds + prompts + cross).mean())


def _draw(world: World, rng: np.random.Generator, seeds: int, prompts: np.ndarray, shift: float,
          effects: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(verdicts: seeds x prompts, seed effects) for one side."""
    u = rng.normal(0, world.seed_sd, seeds) if effects is None else effects
    logit = world.mu + shift + u[:, None] + prompts[None, :] + rng.normal(0, world.cross_sd, (seeds, prompts.size))
    return rng.binomial(world.repeats, world.rate(logit)) / world.repeats, u


def _solve(f: Any, target: float, lo: float = -10.0, hi: float = 10.0) -> float:
    """x in [lo, hi] with f(x) = target, f increasing (bisection)."""
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return lo


def _row(quantity: str, setting: str, hits: list[bool], aim: str, ok: Any) -> dict[str, Any]:
    share = float(np.mean(hits))
    se = math.sqrt(max(share * (1 - share), 1e-12) / len(hits))
    return {"quantity": quantity, "setting": setting, "reps": len(hits), "value": share, "se": se, "aim": aim,
            "met": bool(ok(share, se))}


def _covered(low: float, high: float, truth: float) -> bool:
    return low - 1e-12 <= truth <= high + 1e-12


COVERAGE_AIM = ("93-97 %", lambda v, se: 0.93 - 2 * se <= v <= 0.97 + 2 * se)
FPR_AIM = ("<= 5 %", lambda v, se: v <= 0.05 + 2 * se)


def rate_coverage(world: World, seeds: int, prompts: int, reps: int, seed: int = 0) -> dict[str, Any]:
    """Coverage of a rate cell's interval: Wilson for one checkpoint (truth: that checkpoint over prompts like
    these), the crossed bootstrap for several (truth: seeds and prompts like these)."""
    rng = np.random.default_rng(seed)
    truth_all = _population(world, 0.0, None) if seeds > 1 else float("nan")
    hits = []
    for r in range(reps):
        verdicts, u = _draw(world, rng, seeds, rng.normal(0, world.prompt_sd, prompts), 0.0)
        iv = nested_interval(verdicts, seed=r)
        truth = truth_all if seeds > 1 else _population(world, 0.0, float(u[0]))
        hits.append(iv is not None and _covered(iv.low, iv.high, truth))
    what = "one checkpoint (Wilson)" if seeds == 1 else f"{seeds} seeds (crossed bootstrap)"
    return _row(f"coverage: rate, {what}", _setting(world, seeds, prompts), hits, *COVERAGE_AIM)


def _setting(world: World, seeds: Any, prompts: int) -> str:
    return (f"rate {world.rate(world.mu):.2f}, seeds {seeds}, prompts {prompts}, sd seed/prompt/cross "
            f"{world.seed_sd:g}/{world.prompt_sd:g}/{world.cross_sd:g}" +
            (f", {world.repeats} repeats" if world.repeats > 1 else "") +
            (f", effect {world.effect:+g} logit" if world.effect else ""))


def comparison_runs(world: World, sides: tuple[int, int], prompts: int, reps: int, seed: int = 0,
                    family: int = 1) -> tuple[list[bool], list[bool], list[float]]:
    """(interval covers the true difference, test significant at ALPHA / family, detectable) per replicate
    of method (shifted by ``world.effect``) vs reference over the same prompts. The truth follows the test's
    population: the two checkpoints over prompts like these for one each; the method's seeds (and the
    reference's, when it has several) and prompts like these otherwise."""
    rng = np.random.default_rng(seed)
    covered, significant, detectable = [], [], []
    pop = {k: _population(world, s, None) for k, s in (("a", world.effect), ("b", 0.0))}
    # several seeds against one checkpoint: under the null that checkpoint sits at the seeds' population rate
    fixed = np.array([_solve(lambda u: _population(world, 0.0, u), pop["b"])]) if sides[1] == 1 else None
    for r in range(reps):
        difficulty = rng.normal(0, world.prompt_sd, prompts)
        a, ua = _draw(world, rng, sides[0], difficulty, world.effect)
        # one checkpoint each under the null: the same checkpoint's seed effect, so the two have equal rates
        b, ub = _draw(world, rng, sides[1], difficulty, 0.0, ua if sides == (1, 1) else fixed)
        paired = compare(a, b, seed=r)
        assert paired is not None
        truth_a = _population(world, world.effect, float(ua[0])) if sides[0] == 1 else pop["a"]
        truth_b = _population(world, 0.0, float(ub[0])) if sides[1] == 1 else pop["b"]
        covered.append(_covered(paired.difference.low, paired.difference.high, truth_a - truth_b))
        significant.append(paired.p_value < ALPHA / family and not
                           (paired.difference.low <= 0.0 <= paired.difference.high))
        detectable.append(detectable_difference(paired, family))
    return covered, significant, detectable


def comparison_rows(world: World, sides: tuple[int, int], prompts: int, reps: int,
                    seed: int = 0) -> list[dict[str, Any]]:
    label = {(1, 1): "one checkpoint each (prompt level)"}.get(sides, f"seeds {sides[0]} vs {sides[1]}")
    covered, significant, _ = comparison_runs(world, sides, prompts, reps, seed)
    setting = _setting(world, f"{sides[0]} vs {sides[1]}", prompts)
    rows = [_row(f"coverage: difference, {label}", setting, covered, *COVERAGE_AIM)]
    if world.effect == 0.0:
        rows.append(_row(f"false positives: {label}", setting, significant, *FPR_AIM))
    else:
        rows.append(_row(f"power: {label}", setting, significant, "stated", lambda v, se: True))
    return rows


def power_at_detectable(world: World, prompts: int, reps: int, seed: int = 0) -> dict[str, Any]:
    """The report's 'detectable (80% power)' figure, checked: find the logit effect whose true difference equals
    the median printed figure under the null, then measure the prompt-level test's power there."""
    _, _, printed = comparison_runs(world, (1, 1), prompts, max(20, reps // 10), seed)
    target = float(np.nanmedian(printed))
    # the effect whose expected difference (at a typical seed) is the printed figure
    effect = _solve(lambda e: _population(world, e, 0.0) - _population(world, 0.0, 0.0), target, 0.0, 5.0)
    _, significant, _ = comparison_runs(replace(world, effect=effect), (1, 1), prompts, reps, seed + 1)
    return _row("power at the printed detectable difference, one checkpoint each", _setting(world, "1 vs 1",
                prompts) + f", difference {target:.3f}", significant, "about 80 %",
                lambda v, se: abs(v - 0.8) <= 0.05 + 2 * se)


def family_fwer(reps: int, seed: int = 0, suites: int = 3, methods: int = 2, prompts: int = 60) -> dict[str, Any]:
    """The Holm family under the null, through the report's own path (``comparison_records`` on a judgments
    table): base, plain and ``methods`` mitigations, one checkpoint each, identical in truth; a replicate is a
    false positive if any comparison of the family is significant (Holm p < 0.05 and interval excluding 0)."""
    import pandas as pd

    from capsafe.report.tables import comparison_records

    world, rng = World(mu=-1.0, seed_sd=0.0), np.random.default_rng(seed)
    names = ["base", "plain"] + [f"m{i}" for i in range(methods)]
    trials = pd.DataFrame([{"trial_id": n, "step": 1, "method": n, "status": "base" if n == "base" else "reached",
                            "reached": n != "base"} for n in names])
    hits, family = [], 0
    for _ in range(reps):
        rows = []
        for s in range(suites):
            difficulty = rng.normal(0, world.prompt_sd, prompts)
            for n in names:
                verdicts, _ = _draw(world, rng, 1, difficulty, 0.0, np.zeros(1))
                rows += [{"trial_id": n, "step": 1, "suite": f"s{s}", "suite_kind": "harmful", "prompt_id": str(p),
                          "repeat": 0, "judge": "guard", "verdict": "unsafe" if v else "safe"}
                         for p, v in enumerate(verdicts[0])]
        records = comparison_records(pd.DataFrame(rows), trials)
        family = len(records)
        hits.append(any((r.paired.p_adjusted or 1.0) < ALPHA and not
                        (r.paired.difference.low <= 0.0 <= r.paired.difference.high) for r in records))
    return _row("false positives: the Holm family (any member)", f"{family} null comparisons (vs plain and base), "
                f"{suites} suites x {prompts} prompts, one checkpoint each", hits, *FPR_AIM)


def holm_family_seeds(reps: int, seed: int = 0, family: int = 10) -> dict[str, Any]:
    """Holm's family-wise error over ``family`` independent null 5-vs-5-seed comparisons."""
    rng = np.random.default_rng(seed)
    hits = []
    world = World()
    for r in range(reps):
        ps = []
        for k in range(family):
            difficulty = rng.normal(0, world.prompt_sd, 100)
            paired = compare(_draw(world, rng, 5, difficulty, 0.0)[0], _draw(world, rng, 5, difficulty, 0.0)[0],
                             seed=r * family + k)
            assert paired is not None
            ps.append(paired.p_value)
        hits.append(min(holm(ps)) < ALPHA)
    return _row("false positives: Holm family of 5-vs-5-seed tests", f"{family} null comparisons, 100 prompts",
                hits, *FPR_AIM)


def run(reps: int, quick: bool = False) -> list[dict[str, Any]]:
    """Every row of the calibration table; ``quick`` keeps a few settings of each kind."""
    rows = []
    rate_worlds = [World(mu=-3.5), World(mu=0.0), World(mu=3.5)]
    for world in rate_worlds[:1] + rate_worlds[1:] * (not quick):
        rows += [rate_coverage(world, 1, p, reps) for p in ((50, 500) if not quick else (50,))]
    for seeds, prompts, world in [(5, 100, World(seed_sd=0.1, prompt_sd=2.0)), (5, 100, World(prompt_sd=2.0)),
                                  (5, 100, World(prompt_sd=2.0, repeats=4)),
                                  (5, 100, World(prompt_sd=0.5)),
                                  (3, 100, World(prompt_sd=1.0)), (5, 500, World(mu=-3.0, prompt_sd=1.0)),
                                  (3, 50, World(mu=3.0, seed_sd=0.6))][: 2 if quick else None]:
        rows.append(rate_coverage(world, seeds, prompts, reps))
    for sides, prompts, world in [((1, 1), 200, World()), ((1, 1), 50, World(mu=-3.0)),
                                  ((5, 5), 100, World(prompt_sd=2.0)), ((3, 3), 100, World()),
                                  ((5, 1), 100, World()), ((3, 1), 200, World(mu=-2.0))][: 2 if quick else None]:
        rows += comparison_rows(world, sides, prompts, reps)
    for sides, prompts, world in [((1, 1), 200, World(effect=0.5)), ((5, 5), 200, World(effect=0.5)),
                                  ((5, 5), 200, World(effect=1.0)), ((5, 1), 200, World(effect=1.0))
                                  ][: 1 if quick else None]:
        rows.append(comparison_rows(world, sides, prompts, max(50, reps // 2))[1])
    if not quick:
        rows.append(power_at_detectable(World(), 200, max(100, reps // 2)))
        rows.append(family_fwer(max(50, reps // 5)))
        rows.append(holm_family_seeds(max(50, reps // 5)))
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| quantity | setting | reps | result (± MC s.e.) | aim | met |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['quantity']} | {r['setting']} | {r['reps']} | {r['value']:.1%} ± {r['se']:.1%} | "
                     f"{r['aim']} | {'yes' if r['met'] else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=400, help="replicates per setting")
    parser.add_argument("--quick", action="store_true", help="a few settings of each kind")
    args = parser.parse_args()
    start = time.perf_counter()
    print(markdown(run(args.reps, args.quick)))
    # the stopping rule's in-band share and bias (issue 23 item 1), from its own script beside this one
    print("\nThe stopping rule (benchmarks/calibration_stopping.py):\n")
    print(calibration_stopping.markdown(calibration_stopping.stopping_rows(trials=200 if args.quick else 2000)))
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
