"""The report's statistics, on plain arrays: bootstrap confidence intervals for rates and paired comparisons of
two checkpoints on the same prompts.

The unit of resampling is the prompt. A prompt's value is the mean of its 0/1 outcomes over every seed and
repeat, so repeated samples of one prompt (which are correlated) never count as independent evidence; the
interval covers prompt-to-prompt variation, and the mean over seeds and repeats is what each prompt contributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


def nested_interval(matrix: Sequence[Sequence[float]], seed: int = 0) -> Interval | None:
    """Mean of a checkpoints x prompts matrix of rates (NaN: not measured) with a two-level percentile bootstrap:
    resample the checkpoints (seeds), then the prompts, so that the interval carries seed-to-seed variation as
    well as prompt-to-prompt variation. With one checkpoint it is the prompt bootstrap of ``rate_interval``."""
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or m.size == 0 or np.all(np.isnan(m)):
        return None
    if m.shape[0] == 1:
        return rate_interval(m[0][~np.isnan(m[0])].tolist(), seed)
    rng = np.random.default_rng(seed)
    stats = np.empty(RESAMPLES)
    for b in range(RESAMPLES):
        rows = rng.integers(0, m.shape[0], m.shape[0])
        cols = rng.integers(0, m.shape[1], m.shape[1])
        sample = m[np.ix_(rows, cols)]
        stats[b] = np.nanmean(sample) if not np.all(np.isnan(sample)) else np.nan
    alpha = (1 - CONFIDENCE) / 2
    low, high = np.nanquantile(stats, [alpha, 1 - alpha])
    return Interval(float(np.nanmean(m)), float(low), float(high), int(np.sum(~np.all(np.isnan(m), axis=0))))


@dataclass(frozen=True)
class Paired:
    """method minus reference on the same prompts: mean difference with its bootstrap interval, a two-sided
    sign-flip permutation p-value, and the effect size (mean difference / standard deviation of differences)."""

    difference: Interval
    p_value: float
    effect_size: float | None
    method_rate: float
    reference_rate: float


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


def describe_comparison(method: str, reference: str, what: str, paired: Paired, equal_capability: bool,
                        higher_is_safer: bool) -> str:
    """One plain sentence that says only what the numbers support."""
    d = paired.difference
    numbers = (f"{paired.method_rate:.2f} vs {paired.reference_rate:.2f}; difference {d.value:+.2f}, 95 % CI "
               f"[{d.low:+.2f}, {d.high:+.2f}], p = {paired.p_value:.3g}, {d.n} prompts")
    if d.low <= 0.0 <= d.high or paired.p_value >= 0.05:
        claim = f"{method} and {reference} do not differ detectably in {what}"
    else:
        direction = "higher" if d.value > 0 else "lower"
        safer = (d.value > 0) == higher_is_safer
        claim = (f"{method} has a {direction} {what} than {reference}, "
                 f"{'safer' if safer else 'less safe'} on this suite")
    caveat = "" if equal_capability else \
        "; but the two were not at equal capability, so this is not a matched comparison"
    return f"{claim} ({numbers}){caveat}."
