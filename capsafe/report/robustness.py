"""Does a conclusion survive another benchmark or judge? From the judgments and trials tables alone.

Every comparison of the report's one family (each method against plain fine-tuning and against the base model,
``tables.comparison_records``) is shown under every (suite, judge) pair that measures it. A pair's verdict is
'safer' or 'less safe' (on a helpfulness measure, 'helpfulness cost' or 'more helpful') when the difference is
significant (the family's Holm-adjusted p < 0.05, the same p the statistics section prints, and its 95 %
interval excludes zero), 'no detectable difference' otherwise. A comparison's conclusion is the verdict most
pairs give; a tie is 'no detectable difference'. The sentence says under how many pairs it holds and which pairs
reverse it.

Method rankings per (suite, judge) are compared with Kendall's tau-b per pair of rankings (scipy) and Kendall's W
over all of them (with the tie correction; its chi-square test, Siegel & Castellan 1988).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from capsafe.report.tables import Comparison, comparison_records, measure_of, method_order, per_prompt

SAFER, LESS_SAFE, NO_DIFFERENCE = "safer", "less safe", "no detectable difference"
COST, LESS_COST = "helpfulness cost", "more helpful"  # over-refusal and benign refusal: helpfulness, not safety
OPPOSITE = {SAFER: LESS_SAFE, LESS_SAFE: SAFER, COST: LESS_COST, LESS_COST: COST}
ALPHA = 0.05

# The robustness table as written beside report.md (report_robustness.parquet); pinned by a test.
ROBUSTNESS_SCHEMA = pa.schema([
    ("method", pa.string()),         # the method compared
    ("reference", pa.string()),      # 'plain' or 'base'
    ("suite_kind", pa.string()),     # what the suite measures: harmful, overrefusal, benign
    ("suite", pa.string()),          # the benchmark
    ("judge", pa.string()),          # the judge whose verdicts are counted
    ("measure", pa.string()),        # e.g. 'harmful compliance', 'jailbreak success (aim)'
    ("method_rate", pa.float64()),
    ("reference_rate", pa.float64()),
    ("difference", pa.float64()),    # method minus reference
    ("low", pa.float64()),           # its 95 % interval
    ("high", pa.float64()),
    ("p_value", pa.float64()),
    ("p_holm", pa.float64()),        # Holm-adjusted over the report's one family (every row of this table)
    ("prompts", pa.int64()),         # prompts both sides answered under this pair
    ("inference", pa.string()),      # the unit and test: prompts / seeds vs one / seeds
    ("detectable", pa.float64()),    # smallest |difference| with 80 % power at the family's level (inf: none)
    ("verdict", pa.string()),        # 'safer', 'less safe', 'helpfulness cost', 'more helpful', 'no detectable ...'
    ("conclusion", pa.string()),     # the comparison's verdict under most pairs
    ("agrees", pa.bool_()),          # this pair gives the conclusion
])


def verdict(comparison: Comparison, jailbreaks: dict[str, str] | None = None) -> str:
    """'safer', 'less safe' ('helpfulness cost', 'more helpful' on over-refusal and benign suites) or 'no
    detectable difference' for one comparison under one (suite, judge) pair."""
    paired, d = comparison.paired, comparison.paired.difference
    p = paired.p_adjusted if paired.p_adjusted is not None else paired.p_value
    if p >= ALPHA or d.low <= 0.0 <= d.high:
        return NO_DIFFERENCE
    higher_is_safer = measure_of(comparison.suite, comparison.kind, jailbreaks, comparison.judge)[1]
    if higher_is_safer is None:
        return COST if d.value > 0 else LESS_COST
    return SAFER if (d.value > 0) == higher_is_safer else LESS_SAFE


def conclusion_of(verdicts: list[str]) -> str:
    """The verdict most pairs give; a tie between verdicts is 'no detectable difference' (the pairs do not
    agree on one)."""
    top = max(verdicts.count(v) for v in set(verdicts))
    leaders = [v for v in set(verdicts) if verdicts.count(v) == top]
    return leaders[0] if len(leaders) == 1 else NO_DIFFERENCE


def robustness_table(judgments: pd.DataFrame, trials: pd.DataFrame, jailbreaks: dict[str, str] | None = None,
                     records: list[Comparison] | None = None) -> pd.DataFrame:
    """One row per comparison of the family (method vs plain, method vs base) per suite kind per (suite, judge)
    pair, with ``ROBUSTNESS_SCHEMA``'s columns; pass ``records`` to reuse the report's family."""
    from capsafe.report.tables import inference_label

    records = comparison_records(judgments, trials) if records is None else records
    rows = []
    for r in records:
        d = r.paired.difference
        rows.append({"method": r.method, "reference": r.reference, "suite_kind": r.kind, "suite": r.suite,
                     "judge": r.judge, "measure": measure_of(r.suite, r.kind, jailbreaks, r.judge)[0],
                     "method_rate": r.paired.method_rate, "reference_rate": r.paired.reference_rate,
                     "difference": d.value, "low": d.low, "high": d.high, "p_value": r.paired.p_value,
                     "p_holm": r.paired.p_adjusted, "prompts": d.n, "inference": inference_label(r.paired),
                     "detectable": float("nan") if r.paired.detectable is None else r.paired.detectable,
                     "verdict": verdict(r, jailbreaks)})
    table = pd.DataFrame(rows, columns=[f.name for f in ROBUSTNESS_SCHEMA if f.name not in ("conclusion", "agrees")])
    if table.empty:
        return table.assign(conclusion=pd.Series(dtype=str), agrees=pd.Series(dtype=bool))
    keys = ["method", "reference", "suite_kind"]
    conclusions = table.groupby(keys)["verdict"].agg(lambda v: conclusion_of(list(v))).rename("conclusion")
    table = table.join(conclusions, on=keys)
    return table.assign(agrees=table["verdict"] == table["conclusion"])


def robustness_sentences(table: pd.DataFrame, outside_band: set[str] | None = None) -> list[str]:
    """One sentence per comparison: 'holds under k of n benchmark x judge pairs; reverses under ...'; a
    comparison with a side in ``outside_band`` (methods whose confirmed capability left the equal-capability
    band) says it is not at equal capability."""
    outside_band = outside_band or set()
    sentences = []
    for (method, reference, kind), g in table.groupby(["method", "reference", "suite_kind"], sort=False):
        conclusion = str(g["conclusion"].iloc[0])
        n, k = len(g), int(g["agrees"].sum())
        what = {"harmful": "on harmful requests", "overrefusal": "on over-refusal probes",
                "benign": "on benign requests"}.get(str(kind), f"on {kind} suites")
        text = f"{method} vs {reference} {what}: {conclusion} under {k} of {n} benchmark × judge pair" + \
            ("s" if n != 1 else "")
        opposite = OPPOSITE.get(conclusion)
        others = [v for v in (opposite, SAFER, LESS_SAFE, COST, LESS_COST, NO_DIFFERENCE) if v and v != conclusion]
        for shown in dict.fromkeys(others):  # the reversal first, then the other verdicts
            pairs = g[g["verdict"] == shown]
            if not pairs.empty:
                label = "reverses under" if shown == opposite else f"{shown} under"
                text += f"; {label} " + ", ".join(f"{s} × {j}" for s, j in zip(pairs["suite"], pairs["judge"],
                                                                                strict=True))
        if n == 1:
            text += " (one pair: robustness not testable)"
        off = [m for m in (method, reference) if m in outside_band]
        if off:
            text += (f" Not at equal capability: {' and '.join(off)} confirmed outside the band, so the difference "
                     "may be one of capability")
        sentences.append(text + ".")
    return sentences


def rankings(judgments: pd.DataFrame, trials: pd.DataFrame, kind: str = "harmful") -> pd.DataFrame:
    """Methods (rows) x (suite, judge) pairs (columns): each method's rate on a suite of ``kind`` under a judge
    (mean over prompts of the per-prompt rate); the base model is left out: it is a reference, not a method."""
    columns = {}
    kinds = judgments.drop_duplicates("suite").set_index("suite")["suite_kind"]
    for (suite, judge), _ in judgments.groupby(["suite", "judge"], sort=True):
        if kinds.get(suite) != kind:
            continue
        wide = per_prompt(judgments, trials, str(judge), str(suite))
        if wide.empty:
            continue
        columns[f"{suite} × {judge}"] = wide.mean()
    table = pd.DataFrame(columns)
    return table.loc[[m for m in method_order(table.index) if m != "base"]] if not table.empty else table


def kendall_tau_table(rates: pd.DataFrame) -> pd.DataFrame:
    """Kendall's tau-b between the method rankings of every two (suite, judge) pairs, over the methods both
    rank (nan when fewer than two or a ranking is constant)."""
    from scipy.stats import kendalltau

    rows = []
    for a, b in combinations(rates.columns, 2):
        both = rates[[a, b]].dropna()
        tau = float("nan")
        if len(both) >= 2 and both[a].nunique() > 1 and both[b].nunique() > 1:
            tau = float(kendalltau(both[a], both[b]).statistic)
        rows.append({"ranking a": a, "ranking b": b, "methods": len(both), "kendall tau": tau})
    return pd.DataFrame(rows, columns=["ranking a", "ranking b", "methods", "kendall tau"])


@dataclass(frozen=True)
class Concordance:
    """Kendall's W of m rankings of n methods, its chi-square statistic and p-value."""

    w: float
    rankings: int
    methods: int
    p_value: float


def kendall_w(rates: pd.DataFrame) -> Concordance | None:
    """Kendall's coefficient of concordance over the (suite, judge) rankings (columns) of the methods every
    ranking covers, with tied ranks averaged and the tie correction; None below 2 rankings or 2 methods."""
    from scipy.stats import chi2, rankdata

    complete = rates.dropna()
    m, n = complete.shape[1], complete.shape[0]
    if m < 2 or n < 2:
        return None
    ranks = np.column_stack([rankdata(complete[c]) for c in complete.columns])  # n methods x m rankings
    totals = ranks.sum(axis=1)
    s = float(((totals - totals.mean()) ** 2).sum())
    ties = sum(float((counts ** 3 - counts).sum())
               for counts in (np.unique(ranks[:, j], return_counts=True)[1] for j in range(m)))
    denominator = m ** 2 * (n ** 3 - n) - m * ties
    if denominator <= 0:  # every ranking is one tie: no order to agree on
        return None
    w = 12.0 * s / denominator
    statistic = m * (n - 1) * w
    return Concordance(w=w, rankings=m, methods=n, p_value=float(chi2.sf(statistic, n - 1)))


def describe_concordance(c: Concordance | None) -> str:
    if c is None:
        return "Kendall's W: not defined here (fewer than two rankings or two methods ranked by every pair)."
    strength = "strongly" if c.w >= 0.7 else "moderately" if c.w >= 0.3 else "weakly"
    return (f"Kendall's W = {c.w:.2f} over {c.rankings} rankings of {c.methods} methods (chi-square p = "
            f"{c.p_value:.3g}): the benchmark × judge pairs rank the methods {strength} alike."
            if math.isfinite(c.w) else "Kendall's W: not defined here.")


def display(table: pd.DataFrame) -> pd.DataFrame:
    """The robustness table as the report shows it."""
    return pd.DataFrame({
        "comparison": table["method"] + " vs " + table["reference"], "suite": table["suite"],
        "judge": table["judge"], "measure": table["measure"],
        "difference [95% CI]": [f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]"
                                for d, lo, hi in zip(table["difference"], table["low"], table["high"], strict=True)],
        "p (Holm)": [f"{p:.3g}" for p in table["p_holm"]], "prompts": table["prompts"],
        "detectable (80% power)": ["none" if d == float("inf") else "n/a" if d != d else f"±{d:.2f}"
                                   for d in table["detectable"]],
        "verdict": table["verdict"],
        "agrees with conclusion": table["agrees"].map({True: "yes", False: "NO"})})


def write_robustness(table: pd.DataFrame, path: Path) -> Path:
    """The robustness table as Parquet with ``ROBUSTNESS_SCHEMA``, written atomically."""
    import pyarrow.parquet as pq

    arrow = pa.Table.from_pandas(table[[f.name for f in ROBUSTNESS_SCHEMA]], schema=ROBUSTNESS_SCHEMA,
                                 preserve_index=False)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(arrow, tmp)
    tmp.replace(path)
    return path
