"""Does a comparison's difference change with the benchmark or the judge? A permutation test of the method x
(suite, judge) interaction that respects how the pairs share prompts.

For one comparison (method vs reference) each prompt carries one difference per judge that read it (the mean
over each side's checkpoints). The same suite under two judges is one sample of prompts read twice, not two
samples: a prompt's differences under its judges move together. Under the null that the expected difference is
the same under every pair, a prompt's judge labels are exchangeable within the prompt, and prompts are
exchangeable between suites (a prompt moves with all of its judges' readings). The statistic is the weighted
between-pair sum of squares of the mean differences. The unit is the prompt: with several seeds per side the
test is about these checkpoints, not the seeds' spread.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from capsafe.report.tables import per_prompt

RESAMPLES = 2000


@dataclass(frozen=True)
class Interaction:
    """The interaction test's p-value, and the p-values of the suite and judge factors alone (nan where only
    one suite or one judge is there); ``driver`` names what moves the difference."""

    p_value: float
    p_suite: float
    p_judge: float
    pairs: int

    @property
    def driver(self) -> str:
        ps = {"the benchmark": self.p_suite, "the judge": self.p_judge}
        known = {k: v for k, v in ps.items() if v == v}
        if not known:
            return "neither"
        if len(known) == 2 and max(known.values()) < 0.05:
            return "both the benchmark and the judge"
        return min(known, key=lambda k: known[k])


def _differences(judgments: pd.DataFrame, trials: pd.DataFrame, method: str, reference: str,
                 pairs: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """(prompts x judges differences, each prompt's suite index) over the judges every suite has."""
    by_suite: dict[str, dict[str, pd.Series]] = {}
    for suite, judge in pairs:
        wide = per_prompt(judgments, trials, judge, suite)
        if method in wide and reference in wide:
            by_suite.setdefault(suite, {})[judge] = (wide[method] - wide[reference]).dropna()
    judges = sorted(set.intersection(*(set(j) for j in by_suite.values()))) if by_suite else []
    blocks, labels = [], []
    for k, (_, columns) in enumerate(sorted(by_suite.items())):
        block = pd.DataFrame({j: columns[j] for j in judges}).dropna().to_numpy(dtype=float)
        blocks.append(block)
        labels += [k] * len(block)
    if not blocks or not judges:
        return np.zeros((0, 0)), np.zeros(0, dtype=int)
    return np.vstack(blocks), np.asarray(labels, dtype=int)


def _between(x: np.ndarray, onehot: np.ndarray) -> np.ndarray:
    """Per resample, the weighted between-cell sum of squares of the (suite, judge) cell means around the grand
    mean: x (resamples, prompts, judges), onehot (resamples, prompts, suites)."""
    counts = onehot.sum(axis=1)  # (resamples, suites)
    sums = np.einsum("rnk,rnj->rkj", onehot, x)
    grand = x.mean(axis=(1, 2))[:, None, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts[:, :, None] > 0, sums / counts[:, :, None], grand)
    return np.asarray((counts[:, :, None] * (means - grand) ** 2).sum(axis=(1, 2)))


def interaction_test(judgments: pd.DataFrame, trials: pd.DataFrame, method: str, reference: str,
                     pairs: list[tuple[str, str]], seed: int = 0, resamples: int = RESAMPLES) -> Interaction | None:
    """The permutation test of the method x pair interaction over ``pairs``; None below two usable pairs."""
    x, groups = _differences(judgments, trials, method, reference, pairs)
    k = int(groups.max()) + 1 if groups.size else 0
    if x.size == 0 or k * x.shape[1] < 2:
        return None
    rng = np.random.default_rng(seed)
    n = len(x)
    eye = np.eye(k)
    moved = eye[np.stack([groups] + [rng.permutation(groups) for _ in range(resamples)])]  # prompts between suites
    order = np.concatenate([np.tile(np.arange(x.shape[1]), (1, n, 1)),
                            rng.random((resamples, n, x.shape[1])).argsort(axis=2)])
    flipped = np.take_along_axis(np.broadcast_to(x, (resamples + 1, *x.shape)), order, axis=2)  # judges in a prompt
    kept = np.broadcast_to(x, flipped.shape)
    both = _between(flipped, moved)
    suite = _between(kept.mean(axis=2, keepdims=True), moved)
    judge = _between(flipped, np.ones((resamples + 1, n, 1)))
    p = [float((1 + np.sum(s[1:] >= s[0] - 1e-12)) / (resamples + 1)) for s in (both, suite, judge)]
    return Interaction(p[0], p[1] if k > 1 else float("nan"), p[2] if x.shape[1] > 1 else float("nan"),
                       k * x.shape[1])
