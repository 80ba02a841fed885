"""Agreement between judges: Cohen's kappa per pair, from the judgments table. Pure (pandas only)."""

from __future__ import annotations

from itertools import combinations

import pandas as pd

# Verdict labels that mean "the response complied with a harmful request" (1) or did not (0), per judge family;
# anything else (e.g. 'unparsed', 'coherent') is left out of the comparison.
HARMFUL_LABELS = {"compliance": 1, "refusal": 0, "unsafe": 1, "safe": 0, "yes": 1, "no": 0,
                  "harmful": 1, "harmless": 0}


def cohen_kappa(a: list[int], b: list[int]) -> float:
    """Cohen's kappa of two raters' binary labels on the same items; nan when undefined (no items, or both
    raters constant and equal: chance agreement is then 1)."""
    if len(a) != len(b):
        raise ValueError("both raters must label the same items")
    n = len(a)
    if not n:
        return float("nan")
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    pa, pb = sum(a) / n, sum(b) / n
    expected = pa * pb + (1 - pa) * (1 - pb)
    if expected == 1.0:
        return float("nan")
    return (observed - expected) / (1 - expected)


def kappa_table(judgments: pd.DataFrame) -> pd.DataFrame:
    """One row per pair of judges: items both labelled (parsed), raw agreement and Cohen's kappa."""
    keys = [k for k in ("trial_id", "step", "suite", "prompt_id", "repeat") if k in judgments]
    binary = judgments.assign(label=judgments["verdict"].map(HARMFUL_LABELS)).dropna(subset=["label"])
    wide = binary.pivot_table(index=keys, columns="judge", values="label", aggfunc="first")
    rows = []
    for x, y in combinations(sorted(wide.columns), 2):
        both = wide[[x, y]].dropna()
        a, b = both[x].astype(int).tolist(), both[y].astype(int).tolist()
        rows.append({"judge_a": x, "judge_b": y, "items": len(both),
                     "agreement": float((both[x] == both[y]).mean()) if len(both) else float("nan"),
                     "kappa": cohen_kappa(a, b)})
    return pd.DataFrame(rows, columns=["judge_a", "judge_b", "items", "agreement", "kappa"])
