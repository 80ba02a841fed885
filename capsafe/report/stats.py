"""The report's statistics, on plain arrays: intervals for rates and tests of differences, at the unit that varies.

The design is crossed: every checkpoint (seed) answers the *same* prompts, and repeats of a prompt are averaged
into the prompt's value first (they are not independent evidence). An interval over several checkpoints
generalises to seeds and prompts like these: each bootstrap replicate draws the checkpoints with replacement and
*one* shared prompt resample for all of them (and for both sides of a difference, so it stays paired on prompts).
A single checkpoint's interval generalises to prompts like these, for that checkpoint.

Tests are permutation tests, exact where the enumeration is small (relabelings of seeds, sign flips of a few
seeds or prompts), otherwise with enough random resamples that the smallest p is far below alpha over the family
(``resamples_for``). The unit is the seed whenever either side has more than one: one checkpoint each is a claim
about two checkpoints, tested over prompts.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CONFIDENCE = 0.95
ALPHA = 0.05
RESAMPLES = 4000
# Levels of inference a comparison can have (Paired.level), and the test each one runs.
PROMPTS, SEEDS_VS_ONE, SEEDS = "prompts", "seeds vs one", "seeds"
TESTS = {PROMPTS: "sign-flip permutation test over prompts",
         SEEDS_VS_ONE: "exact sign-flip test of the seeds' differences from the single checkpoint",
         SEEDS: "exact permutation test of the seed labels"}


@dataclass(frozen=True)
class Interval:
    """A rate (or difference) with its 95 % interval; ``n`` prompts."""

    value: float
    low: float
    high: float
    n: int

    def text(self) -> str:
        return f"{self.value:.2f} [{self.low:.2f}, {self.high:.2f}]"


def rate_interval(per_prompt: Sequence[float], seed: int = 0, resamples: int = RESAMPLES) -> Interval | None:
    """Mean of per-prompt values with a percentile bootstrap interval over prompts (scipy ``bootstrap``; None for
    no prompts). A constant sample gets a zero-width interval: the data show no variation to resample."""
    from scipy.stats import bootstrap

    x = np.asarray(per_prompt, dtype=float)
    if x.size == 0:
        return None
    mean = float(x.mean())
    if x.size == 1 or np.all(x == x[0]):
        return Interval(mean, mean, mean, int(x.size))
    res = bootstrap((x,), np.mean, confidence_level=CONFIDENCE, n_resamples=resamples, method="percentile",
                    rng=np.random.default_rng(seed))
    return Interval(mean, float(res.confidence_interval.low), float(res.confidence_interval.high), int(x.size))


def proportion_interval(per_prompt: Sequence[float]) -> Interval | None:
    """A single checkpoint's rate over prompts with the Wilson score interval (statsmodels ``proportion_confint``):
    a rate of 0 or 1 gets an interval of the width its sample size supports ([0.95, 1.00] over 68 prompts), not
    the zero width a bootstrap of a constant sample gives. Per-prompt values that are means over repeats count
    as that fraction of one success; the prompt is the unit, which makes the interval conservative for them."""
    from statsmodels.stats.proportion import proportion_confint

    x = np.asarray(per_prompt, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return None
    low, high = proportion_confint(float(x.sum()), int(x.size), alpha=1 - CONFIDENCE, method="wilson")
    mean = float(x.mean())
    # statsmodels' bounds at 0 and 1 are a rounding error off (5.6e-17 for 0 of 3): the interval must hold
    # its rate exactly, or a plot's error bar turns negative
    low, high = (0.0 if mean == 0.0 else min(float(low), mean)), (1.0 if mean == 1.0 else max(float(high), mean))
    return Interval(mean, low, high, int(x.size))


def _row_means(m: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a checkpoint with no measured prompt
        return np.asarray(np.nanmean(m, axis=1))


def crossed_means(matrices: Sequence[Any], seed: int = 0, resamples: int = RESAMPLES) -> list[np.ndarray]:
    """Bootstrap distributions of the means of checkpoints x prompts matrices over the *same* prompts (NaN: not
    measured). Every replicate draws one prompt resample shared by all matrices (prompts are crossed with
    checkpoints, and a difference stays paired on them) and, per matrix, its checkpoints with replacement; the
    statistic is the mean over the drawn checkpoints of each one's mean over the drawn prompts."""
    ms = [np.asarray(m, dtype=float) for m in matrices]
    rng = np.random.default_rng(seed)
    p = ms[0].shape[1]
    prompts = rng.multinomial(p, np.full(p, 1.0 / p), size=resamples).T.astype(float)  # (p, resamples) counts
    out = []
    for m in ms:
        measured = ~np.isnan(m)
        with np.errstate(invalid="ignore", divide="ignore"):
            rows = (np.where(measured, m, 0.0) @ prompts) / (measured.astype(float) @ prompts)  # (c, resamples)
        c = m.shape[0]
        seeds = rng.multinomial(c, np.full(c, 1.0 / c), size=resamples).T.astype(float)  # (c, resamples)
        weight = np.where(np.isnan(rows), 0.0, seeds)
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(np.nansum(np.where(np.isnan(rows), 0.0, rows) * weight, axis=0) / weight.sum(axis=0))
    return out


def _percentile(stats: np.ndarray) -> tuple[float, float]:
    alpha = (1 - CONFIDENCE) / 2
    low, high = np.nanquantile(stats, [alpha, 1 - alpha])
    return float(low), float(high)


def nested_interval(matrix: Sequence[Sequence[float]], seed: int = 0) -> Interval | None:
    """Mean of a checkpoints x prompts matrix of rates (NaN: not measured). With several checkpoints (seeds), the
    crossed bootstrap of ``crossed_means`` (seeds and prompts like these); with one, the Wilson interval of
    ``proportion_interval`` (prompts like these, for that checkpoint)."""
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or m.size == 0 or np.all(np.isnan(m)):
        return None
    if m.shape[0] == 1:
        return proportion_interval(m[0].tolist())
    low, high = _percentile(crossed_means([m], seed)[0])
    value = float(np.nanmean(_row_means(m)))
    return Interval(value, min(low, value), max(high, value), int(np.sum(~np.all(np.isnan(m), axis=0))))


@dataclass(frozen=True)
class Paired:
    """method minus reference: mean difference with its 95 % interval, a two-sided permutation p-value and the
    effect size. ``level`` names the unit: PROMPTS (one checkpoint each: the sign-flip test over prompts;
    effect size = mean difference / SD of the per-prompt differences), SEEDS_VS_ONE (several seeds against one
    checkpoint: the seeds' differences from it, sign-flipped; effect size = mean / SD of those) or SEEDS
    (several each: the seed labels permuted; effect size = difference / pooled SD of seed means).
    ``p_adjusted`` is set once the report's family of comparisons is known (Holm); ``detectable`` is the
    smallest difference the comparison had 80 % power to detect at the family's level (inf: none)."""

    difference: Interval
    p_value: float
    effect_size: float | None
    method_rate: float
    reference_rate: float
    level: str = PROMPTS
    checkpoints: tuple[int, int] = (1, 1)
    p_adjusted: float | None = None
    se: float = float("nan")
    min_p: float = 0.0
    detectable: float | None = None

    @property
    def test(self) -> str:
        return TESTS[self.level]


def resamples_for(family: int, alpha: float = ALPHA) -> int:
    """Random resamples a permutation test needs so that its smallest p (2 / (resamples + 1), two-sided) times
    the family size stays 20 times below alpha: Holm can then still find a difference in any member."""
    return int(min(2_000_000, max(RESAMPLES, math.ceil(40 * max(family, 1) / alpha))))


def _sign_flip_p(d: np.ndarray, seed: int, resamples: int) -> float:
    """Two-sided sign-flip permutation p of mean(d) = 0 (scipy ``permutation_test``, exact when the 2^n sign
    patterns number no more than ``resamples``)."""
    from scipy.stats import permutation_test

    if np.all(d == 0):
        return 1.0
    res = permutation_test((d,), np.mean, permutation_type="samples", n_resamples=resamples, vectorized=True,
                           alternative="two-sided", rng=np.random.default_rng(seed))
    return float(res.pvalue)


def sign_flip_min_p(n: int, resamples: int = RESAMPLES) -> float:
    """The smallest two-sided p the sign-flip test of n units can give: 2 / 2^n exact, else 2 / (resamples + 1)."""
    return min(1.0, 2.0 / 2.0 ** n if 2 ** min(n, 62) <= resamples else 2.0 / (resamples + 1))


def min_permutation_p(n_method: int, n_reference: int) -> float:
    """The smallest two-sided p an exact permutation test of seed labels can give: 2 / C(n1 + n2, n1)
    (0.33 with 2 + 2 seeds, 0.1 with 3 + 3, 0.0079 with 5 + 5)."""
    return min(1.0, 2.0 / math.comb(n_method + n_reference, n_method))


def paired_comparison(method: Sequence[float], reference: Sequence[float], seed: int = 0,
                      resamples: int = RESAMPLES) -> Paired | None:
    """Two checkpoints' per-prompt rates in the same prompt order (None if no prompts): the bootstrap interval
    over prompts and the sign-flip test over prompts."""
    a, b = np.asarray(method, dtype=float), np.asarray(reference, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same prompts: {a.size} vs {b.size} values")
    if a.size == 0:
        return None
    d = a - b
    interval = rate_interval(d, seed) or Interval(0.0, 0.0, 0.0, 0)
    sd = float(d.std(ddof=1)) if d.size > 1 else 0.0
    return Paired(interval, _sign_flip_p(d, seed, resamples), float(d.mean() / sd) if sd > 0 else None,
                  float(a.mean()), float(b.mean()), se=sd / math.sqrt(d.size) if d.size > 1 else float("nan"),
                  min_p=sign_flip_min_p(int(d.size), resamples))


def seed_level_comparison(method: Any, reference: Any,
                          seed: int = 0, resamples: int = RESAMPLES) -> Paired | None:
    """Two checkpoints x prompts matrices over the same prompts, at least one with several checkpoints (seeds);
    None when both have one (then it is ``paired_comparison``). The difference of the mean rates has the
    crossed-bootstrap interval of ``crossed_means`` (prompts shared by both sides). The test is at the seed
    level: with several seeds on both sides an exact permutation test of the seed labels (2 + 2 seeds cannot
    give p below 1/3); against a single checkpoint, an exact sign-flip test of each seed's difference from it
    (3 seeds cannot give p below 0.25)."""
    from scipy.stats import permutation_test

    a_m, b_m = np.asarray(method, dtype=float), np.asarray(reference, dtype=float)
    if a_m.shape[0] < 2 and b_m.shape[0] < 2:
        return None
    shared = ~(np.all(np.isnan(a_m), axis=0) | np.all(np.isnan(b_m), axis=0))
    a_m, b_m = a_m[:, shared], b_m[:, shared]
    a, b = _row_means(a_m), _row_means(b_m)
    boot_a, boot_b = crossed_means([a_m, b_m], seed)
    diffs = boot_a - boot_b
    low, high = _percentile(diffs)
    value = float(np.nanmean(a) - np.nanmean(b))
    counts = (int(a.size), int(b.size))
    if min(counts) == 1:  # one side is a single checkpoint: each seed of the other against it
        single, many, sign = (b[0], a, 1.0) if counts[1] == 1 else (a[0], b, -1.0)
        d = sign * (many - single)
        p, level, min_p = _sign_flip_p(d, seed, resamples), SEEDS_VS_ONE, sign_flip_min_p(d.size, resamples)
        sd = float(d.std(ddof=1))
        effect = float(d.mean() / sd) if sd > 0 else None
    else:
        if np.all(np.concatenate([a, b]) == a[0]):
            p = 1.0
        else:
            res = permutation_test((a, b), lambda x, y, axis=-1: np.mean(x, axis=axis) - np.mean(y, axis=axis),
                                   permutation_type="independent", alternative="two-sided", vectorized=True,
                                   n_resamples=resamples, rng=np.random.default_rng(seed))
            p = float(res.pvalue)
        level, min_p = SEEDS, min_permutation_p(*counts)
        pooled = float(np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2))
        effect = value / pooled if pooled > 0 else None
    return Paired(Interval(value, min(low, value), max(high, value), int(shared.sum())), p, effect,
                  float(np.nanmean(a)), float(np.nanmean(b)), level, counts, se=float(np.nanstd(diffs)),
                  min_p=min_p)


def compare(method: Any, reference: Any, seed: int = 0, resamples: int = RESAMPLES) -> Paired | None:
    """method vs reference, checkpoints x prompts matrices over the same prompts, at the unit that varies: the
    seed when either side has more than one checkpoint, the prompt when both have one."""
    a_m, b_m = np.asarray(method, dtype=float), np.asarray(reference, dtype=float)
    if a_m.size == 0 or b_m.size == 0:
        return None
    if a_m.shape[0] > 1 or b_m.shape[0] > 1:
        return seed_level_comparison(a_m, b_m, seed, resamples)
    both = ~(np.isnan(a_m[0]) | np.isnan(b_m[0]))
    return paired_comparison(a_m[0, both], b_m[0, both], seed, resamples)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (statsmodels ``multipletests``)."""
    from statsmodels.stats.multitest import multipletests

    if not p_values:
        return []
    return [float(p) for p in multipletests(list(p_values), alpha=ALPHA, method="holm")[1]]
