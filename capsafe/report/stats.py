"""The report's statistics, on plain arrays: bootstrap confidence intervals for rates and paired comparisons of
two checkpoints on the same prompts.

The unit of resampling is the prompt. A prompt's value is the mean of its 0/1 outcomes over every seed and
repeat, so repeated samples of one prompt (which are correlated) never count as independent evidence; the
interval covers prompt-to-prompt variation, and the mean over seeds and repeats is what each prompt contributes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 4000


@dataclass(frozen=True)
class Interval:
    """A rate with its 95 % bootstrap interval over prompts; ``n`` prompts."""

    value: float
    low: float
    high: float
    n: int

    def text(self) -> str:
        return f"{self.value:.2f} [{self.low:.2f}, {self.high:.2f}]"


def rate_interval(per_prompt: Sequence[float], seed: int = 0) -> Interval | None:
    """Mean of per-prompt rates with a percentile bootstrap interval (None for no prompts). A constant sample
    (every prompt 0, or every prompt 1) gets a zero-width interval: the data show no variation to resample."""
    from scipy.stats import bootstrap

    x = np.asarray(per_prompt, dtype=float)
    if x.size == 0:
        return None
    mean = float(x.mean())
    if x.size == 1 or np.all(x == x[0]):
        return Interval(mean, mean, mean, int(x.size))
    res = bootstrap((x,), np.mean, confidence_level=CONFIDENCE, n_resamples=RESAMPLES, method="percentile",
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


def hierarchical_means(matrix: Any, seed: int = 0, resamples: int = RESAMPLES) -> np.ndarray:
    """Bootstrap distribution of the mean of a checkpoints x prompts matrix (NaN: not measured), two levels:
    draw checkpoints with replacement, then, for each drawn checkpoint on its own, draw its prompts with
    replacement; the statistic is the mean of the drawn checkpoints' means."""
    m = np.asarray(matrix, dtype=float)
    rng = np.random.default_rng(seed)
    c, p = m.shape
    rows = rng.integers(0, c, (resamples, c))
    cols = rng.integers(0, p, (resamples, c, p))
    sample = m[rows[:, :, None], cols]  # (resamples, c, p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a drawn row of prompts a checkpoint was never asked
        return np.asarray(np.nanmean(np.nanmean(sample, axis=2), axis=1))


def nested_interval(matrix: Sequence[Sequence[float]], seed: int = 0) -> Interval | None:
    """Mean of a checkpoints x prompts matrix of rates (NaN: not measured). With several checkpoints (seeds), a
    two-level percentile bootstrap (``hierarchical_means``), so the interval carries seed-to-seed variation as
    well as prompt-to-prompt variation; with one, the Wilson interval of ``proportion_interval``."""
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or m.size == 0 or np.all(np.isnan(m)):
        return None
    if m.shape[0] == 1:
        return proportion_interval(m[0].tolist())
    stats = hierarchical_means(m, seed)
    alpha = (1 - CONFIDENCE) / 2
    low, high = np.nanquantile(stats, [alpha, 1 - alpha])
    row_means = np.nanmean(m, axis=1)
    return Interval(float(np.nanmean(row_means)), float(low), float(high),
                    int(np.sum(~np.all(np.isnan(m), axis=0))))


@dataclass(frozen=True)
class Paired:
    """method minus reference: mean difference with its bootstrap interval, a two-sided permutation p-value,
    and the effect size. ``level`` says what the inference covers: 'prompts' (one checkpoint each: the
    sign-flip test over prompts; effect size = mean difference / SD of the differences) or 'seeds' (several
    checkpoints each: a two-level bootstrap and a permutation test of the checkpoint labels; effect size =
    difference / pooled SD of checkpoint means). ``p_adjusted`` is set once all comparisons of a report are
    known (Holm)."""

    difference: Interval
    p_value: float
    effect_size: float | None
    method_rate: float
    reference_rate: float
    level: str = "prompts"
    checkpoints: tuple[int, int] = (1, 1)
    p_adjusted: float | None = None


def paired_comparison(method: Sequence[float], reference: Sequence[float], seed: int = 0) -> Paired | None:
    """Compare per-prompt rates of two checkpoints given in the same prompt order (None if no prompts)."""
    from scipy.stats import permutation_test

    a, b = np.asarray(method, dtype=float), np.asarray(reference, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same prompts: {a.size} vs {b.size} values")
    if a.size == 0:
        return None
    d = a - b
    interval = rate_interval(d, seed) or Interval(0.0, 0.0, 0.0, 0)
    if np.all(d == 0):
        p = 1.0
    else:
        res = permutation_test((d,), np.mean, permutation_type="samples", n_resamples=RESAMPLES,
                               alternative="two-sided", rng=np.random.default_rng(seed))
        p = float(res.pvalue)
    sd = float(d.std(ddof=1)) if d.size > 1 else 0.0
    effect = float(d.mean() / sd) if sd > 0 else None
    return Paired(interval, p, effect, float(a.mean()), float(b.mean()))


def seed_level_comparison(method: Sequence[Sequence[float]], reference: Sequence[Sequence[float]],
                          seed: int = 0) -> Paired | None:
    """Two methods with several checkpoints (seeds) each, checkpoints x prompts matrices of rates: the
    difference of their mean rates, its interval from independent two-level bootstraps of each method, and an
    exact permutation test of which checkpoints belong to which method (with 2 + 2 seeds the smallest possible p
    is 1/3: few seeds cannot show a difference, and the report says so)."""
    from scipy.stats import permutation_test

    a_m, b_m = np.asarray(method, dtype=float), np.asarray(reference, dtype=float)
    if a_m.shape[0] < 2 or b_m.shape[0] < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        a, b = np.nanmean(a_m, axis=1), np.nanmean(b_m, axis=1)
    diffs = hierarchical_means(a_m, seed) - hierarchical_means(b_m, seed + 1)
    alpha = (1 - CONFIDENCE) / 2
    low, high = np.nanquantile(diffs, [alpha, 1 - alpha])
    value = float(a.mean() - b.mean())
    if np.all(np.concatenate([a, b]) == a[0]):
        p = 1.0
    else:
        res = permutation_test((a, b), lambda x, y: np.mean(x) - np.mean(y), permutation_type="independent",
                               alternative="two-sided", n_resamples=RESAMPLES, rng=np.random.default_rng(seed))
        p = float(res.pvalue)
    pooled = float(np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2))
    prompts = int(np.sum(~np.all(np.isnan(np.vstack([a_m, b_m])), axis=0)))
    return Paired(Interval(value, float(low), float(high), prompts), p, value / pooled if pooled > 0 else None,
                  float(a.mean()), float(b.mean()), "seeds", (int(a.size), int(b.size)))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (statsmodels ``multipletests``)."""
    from statsmodels.stats.multitest import multipletests

    if not p_values:
        return []
    return [float(p) for p in multipletests(list(p_values), alpha=0.05, method="holm")[1]]


def min_permutation_p(n_method: int, n_reference: int) -> float:
    """The smallest two-sided p an exact permutation test of checkpoint labels can give: 2 / C(n1 + n2, n1)
    (0.33 with 2 + 2 seeds, 0.1 with 3 + 3, 0.0079 with 5 + 5)."""
    return min(1.0, 2.0 / math.comb(n_method + n_reference, n_method))


def describe_comparison(method: str, reference: str, what: str, paired: Paired, equal_capability: bool,
                        higher_is_safer: bool) -> str:
    """One plain sentence that says only what the numbers support."""
    d = paired.difference
    p = paired.p_adjusted if paired.p_adjusted is not None else paired.p_value
    adjusted = f"Holm-adjusted p = {p:.3g}" if paired.p_adjusted is not None else f"p = {p:.3g}"
    over = (f"{d.n} prompts, seeds {paired.checkpoints[0]} vs {paired.checkpoints[1]}" if paired.level == "seeds"
            else f"{d.n} prompts")
    numbers = (f"{paired.method_rate:.2f} vs {paired.reference_rate:.2f}; difference {d.value:+.2f}, 95 % CI "
               f"[{d.low:+.2f}, {d.high:+.2f}], {adjusted}, {over}")
    if paired.level == "prompts":  # one checkpoint each: a statement about those two checkpoints only
        method, reference = f"the {method} checkpoint", f"the {reference} checkpoint"
    if d.low <= 0.0 <= d.high or p >= 0.05:
        claim = f"{method} and {reference} do not differ detectably in {what}"
    else:
        direction = "higher" if d.value > 0 else "lower"
        safer = (d.value > 0) == higher_is_safer
        claim = (f"{method} has a {direction} {what} than {reference}, "
                 f"{'safer' if safer else 'less safe'} on this suite")
    caveat = "" if equal_capability else \
        "; but the two were not at equal capability, so this is not a matched comparison"
    if paired.level == "seeds":
        floor = min_permutation_p(*paired.checkpoints)
        if floor >= 0.05 and claim.endswith(f"do not differ detectably in {what}"):
            caveat += (f"; with {paired.checkpoints[0]} + {paired.checkpoints[1]} seeds an exact permutation test "
                       f"cannot give p below {floor:.2g}: run at least 5 seeds per method to detect a difference")
    if paired.level == "prompts":
        caveat += "; one seed each, so it compares these checkpoints, not the methods"
        claim = claim[0].upper() + claim[1:]  # "The ... checkpoint"
    return f"{claim} ({numbers}){caveat}."
