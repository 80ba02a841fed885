"""What a comparison may claim: the smallest difference it could have detected, the smallest adjusted p a plan
can reach before anything trains, and the one sentence the report writes per comparison.

The family is every comparison the report states a verdict on (each method against plain fine-tuning and
against the base model, per suite and judge); its p-values are Holm-adjusted once and that p is used in every
table, sentence and finding. Holm's smallest adjusted p is the family size times the smallest raw p, so a plan
whose tests cannot go below alpha / family cannot find anything, however large the differences.
"""

from __future__ import annotations

import math
from typing import Any

from capsafe.report.stats import (
    ALPHA,
    PROMPTS,
    SEEDS,
    SEEDS_VS_ONE,
    Paired,
    min_permutation_p,
    resamples_for,
    sign_flip_min_p,
)

POWER = 0.80


def detectable_difference(paired: Paired, family: int, alpha: float = ALPHA) -> float:
    """The smallest |difference| this comparison had 80 % power to detect at Holm's strictest level
    alpha / family (two-sided): (z_{1 - alpha'/2} + z_0.8) x its standard error, with Student's t quantiles on
    the seeds' degrees of freedom for a seed-level test; inf when its test cannot reach alpha / family at all."""
    from scipy.stats import norm, t

    level = alpha / max(family, 1)
    if paired.min_p >= level or not math.isfinite(paired.se) or paired.se <= 0:
        return math.inf if paired.min_p >= level else float("nan")
    n1, n2 = paired.checkpoints
    df = {PROMPTS: None, SEEDS_VS_ONE: max(n1, n2) - 1, SEEDS: n1 + n2 - 2}[paired.level]
    if df is None:
        return float((norm.ppf(1 - level / 2) + norm.ppf(POWER)) * paired.se)
    return float((t.ppf(1 - level / 2, df) + t.ppf(POWER, df)) * paired.se)


def rate_pairs(spec: Any) -> list[tuple[str, str]]:
    """(suite, judge) pairs a spec's report gives a rate for: the refusal-keyword judge on every suite, each LLM
    judge (a harm judge) on harmful ones; an XSTest suite without 'only' yields a harmful and an over-refusal
    suite of its own items."""
    rule = "refusal_keywords" in spec.eval.judges
    pairs = []
    for suite in spec.eval.suites:
        kinds = ["harmful", "overrefusal"] if suite.format == "xstest" and suite.only is None else [suite.kind]
        for kind in kinds:
            name = f"{suite.name} ({kind})" if len(kinds) > 1 else suite.name
            pairs += [(name, "refusal_keywords")] if rule else []
            pairs += [(name, j.name) for j in spec.eval.llm_judges] if kind == "harmful" else []
    return pairs


def _seeds_needed(family: int, floor: Any, alpha: float) -> int | None:
    return next((n for n in range(2, 41) if family * floor(n) < alpha), None)


def plan_floor(spec: Any, alpha: float = ALPHA) -> tuple[int, list[str]]:
    """(family size, lines) for ``capsafe validate`` and a run's first lines: how many comparisons share one
    Holm family, the smallest adjusted p each kind of comparison can reach, and, when none can fall below
    alpha, that no comparison can be significant and how many seeds would change that."""
    methods = [m.name for m in spec.methods]
    units = len(spec.seeds) * len(spec.train.learning_rates)  # checkpoints per method, if every trial reaches
    pairs = len(rate_pairs(spec))
    vs_plain = [m for m in methods if m != "plain"] if "plain" in methods else []
    family = (len(vs_plain) + len(methods)) * pairs
    resamples = resamples_for(family, alpha)
    if units > 1:
        floors = {"plain": min_permutation_p(units, units), "base": sign_flip_min_p(units, resamples)}
        tests = "seed level: exact permutation of seed labels vs plain, exact sign flips of seeds vs base"
    else:
        floors = {"plain": 2.0 / (resamples + 1), "base": 2.0 / (resamples + 1)}
        tests = f"prompt level (one checkpoint per method): sign-flip tests with {resamples} resamples"
    if not vs_plain:
        floors.pop("plain")
    adjusted = {ref: min(1.0, family * p) for ref, p in floors.items()}
    lines = [f"statistics: {family} comparison(s) in one Holm family ({len(vs_plain)} method(s) vs plain, "
             f"{len(methods)} vs base, over {pairs} suite x judge pair(s)); {tests}; smallest Holm-adjusted p "
             "reachable: " + ", ".join(f"vs {ref} {p:.3g}" for ref, p in adjusted.items())]
    if all(p >= alpha for p in adjusted.values()):
        plain = _seeds_needed(family, lambda n: min_permutation_p(n, n), alpha)
        base = _seeds_needed(family, lambda n: 2.0 ** (1 - n), alpha)
        lines.append(f"NO comparison can be significant at {alpha:g} with {units} checkpoint(s) per method and "
                     f"{family} comparisons, whatever the differences: run at least {plain} seeds per method to "
                     f"test against plain and {base} against base, or compare fewer methods, suites or judges.")
    elif any(p >= alpha for p in adjusted.values()):
        blocked = [ref for ref, p in adjusted.items() if p >= alpha]
        lines.append(f"comparisons vs {' and '.join(blocked)} cannot be significant at {alpha:g} with {units} "
                     f"checkpoint(s) per method and {family} comparisons.")
    return family, lines


def describe_comparison(method: str, reference: str, what: str, paired: Paired, equal_capability: bool,
                        higher_is_safer: bool | None, family: int | None = None) -> str:
    """One plain sentence that says only what the numbers support: the direction (a rise in a helpfulness cost
    is not 'less safe': ``higher_is_safer`` None names no safety direction), the test done, the population the
    interval generalises to, and for no detectable difference how large a difference could have been missed."""
    d = paired.difference
    p = paired.p_adjusted if paired.p_adjusted is not None else paired.p_value
    adjusted = (f"Holm-adjusted p = {p:.3g} over {family} comparisons" if paired.p_adjusted is not None and family
                else f"Holm-adjusted p = {p:.3g}" if paired.p_adjusted is not None else f"p = {p:.3g}")
    n1, n2 = paired.checkpoints
    over = {PROMPTS: f"{d.n} prompts, one checkpoint each; prompts like these",
            SEEDS_VS_ONE: f"{d.n} prompts, {n1} vs {n2} checkpoint(s); seeds and prompts like these",
            SEEDS: f"{d.n} prompts, seeds {n1} vs {n2}; seeds and prompts like these"}[paired.level]
    numbers = (f"{paired.method_rate:.2f} vs {paired.reference_rate:.2f}; difference {d.value:+.2f}, 95 % CI "
               f"[{d.low:+.2f}, {d.high:+.2f}], {paired.test}, {adjusted}, {over}")
    if paired.level == PROMPTS:  # one checkpoint each: a statement about those two checkpoints only
        method, reference = f"the {method} checkpoint", f"the {reference} checkpoint"
    caveat = ""
    if d.low <= 0.0 <= d.high or p >= ALPHA:
        claim = f"{method} and {reference} do not differ detectably in {what}"
        if paired.detectable is not None and math.isinf(paired.detectable):
            caveat += (f"; its test cannot give p below {paired.min_p:.2g} before adjustment, so no difference of "
                       "any size was detectable here: run more seeds per method")
        elif paired.detectable is not None and math.isfinite(paired.detectable):
            caveat += f"; a difference of up to ±{paired.detectable:.2f} could have been missed (80 % power)"
    else:
        direction = "higher" if d.value > 0 else "lower"
        claim = f"{method} has a {direction} {what} than {reference}"
        if higher_is_safer is not None:
            claim += f", {'safer' if (d.value > 0) == higher_is_safer else 'less safe'} on this suite"
        elif d.value > 0:
            claim += ", a helpfulness cost on this suite"
    if not equal_capability:
        caveat += "; but the two were not at equal capability, so this is not a matched comparison"
    if paired.level == PROMPTS:
        caveat += "; one seed each, so it compares these checkpoints, not the methods"
        claim = claim[0].upper() + claim[1:]  # "The ... checkpoint"
    return f"{claim} ({numbers}){caveat}."
