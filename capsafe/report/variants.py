"""Judge prompt variants in the report: how far each rate moves when only the judge's prompt is reworded, and
whether the methods' ranking survives the rewording.

A variant's verdicts are recorded as judge ``<judge>@<variant>``. They are kept out of every other table (the
robustness table counts benchmarks x judges, not wordings) and compared here with the published prompt's
verdicts on the same responses.
"""

from __future__ import annotations

import math

import pandas as pd

from capsafe.report.tables import per_prompt

VARIANT_MARK = "@"


def split_variants(judgments: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the published prompts' judgments, the variants' judgments)."""
    if judgments.empty:
        return judgments, judgments
    is_variant = judgments["judge"].str.contains(VARIANT_MARK, regex=False)
    return judgments[~is_variant], judgments[is_variant]


def _rates(judgments: pd.DataFrame, trials: pd.DataFrame, judge: str, suite: str) -> pd.Series:
    wide = per_prompt(judgments, trials, judge, suite)
    return wide.mean() if not wide.empty else pd.Series(dtype=float)


def _families(variants: pd.DataFrame) -> dict[str, list[str]]:
    """Published judge -> its variants' judge names."""
    out: dict[str, list[str]] = {}
    for name in sorted(variants["judge"].unique()):
        out.setdefault(name.split(VARIANT_MARK)[0], []).append(name)
    return out


def variant_table(judgments: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """Per judge with variants, suite and method: the rate under the published prompt and under each variant,
    and the spread (largest minus smallest) in points."""
    published, variants = split_variants(judgments)
    if variants.empty:
        return pd.DataFrame()
    rows = []
    for judge, names in _families(variants).items():
        for suite in sorted(variants[variants["judge"].isin(names)]["suite"].unique()):
            columns = {"published": _rates(published, trials, judge, suite)}
            columns |= {n.split(VARIANT_MARK, 1)[1]: _rates(variants, trials, n, suite) for n in names}
            table = pd.DataFrame(columns)
            for method, r in table.iterrows():
                values = r.dropna()
                rows.append({"judge": judge, "suite": suite, "method": method, **r.to_dict(),
                             "spread (points)": 100 * float(values.max() - values.min()) if len(values) else None})
    return pd.DataFrame(rows)


def variant_rankings(judgments: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """Kendall's tau-b between the methods' ranking (base model left out) under the published prompt and under
    each variant, per judge and suite (nan when fewer than two methods or a ranking is constant)."""
    from scipy.stats import kendalltau

    published, variants = split_variants(judgments)
    rows = []
    for judge, names in _families(variants).items():
        for suite in sorted(variants[variants["judge"].isin(names)]["suite"].unique()):
            ref = _rates(published, trials, judge, suite).drop("base", errors="ignore")
            for name in names:
                other = _rates(variants, trials, name, suite).drop("base", errors="ignore")
                both = pd.concat([ref.rename("a"), other.rename("b")], axis=1).dropna()
                tau = float("nan")
                if len(both) >= 2 and both["a"].nunique() > 1 and both["b"].nunique() > 1:
                    tau = float(kendalltau(both["a"], both["b"]).statistic)
                rows.append({"judge": judge, "suite": suite, "variant": name.split(VARIANT_MARK, 1)[1],
                             "methods": len(both), "kendall tau vs published": tau})
    return pd.DataFrame(rows)


def variant_sentence(table: pd.DataFrame, taus: pd.DataFrame) -> str:
    """One sentence: the largest move of a rate across variants, and how well rankings survived."""
    if table.empty:
        return "No judge prompt variants were run."
    worst = table.loc[table["spread (points)"].astype(float).idxmax()]
    text = (f"Rewording the judge's prompt moved a rate by up to {worst['spread (points)']:.0f} points "
            f"({worst['judge']}, {worst['suite']}, {worst['method']}); the median spread is "
            f"{table['spread (points)'].astype(float).median():.0f} points.")
    finite = taus["kendall tau vs published"].dropna() if not taus.empty else pd.Series(dtype=float)
    if finite.empty:
        return text + " Whether rankings survive is not testable here (fewer than two methods with distinct rates)."
    kept = int((finite >= 1.0 - 1e-9).sum())
    mean = float(finite.mean())
    return text + (f" Method rankings under the variants agree with the published prompt's with mean Kendall's "
                   f"tau {mean:.2f}; {kept} of {len(finite)} variant rankings are identical to it."
                   if math.isfinite(mean) else "")
