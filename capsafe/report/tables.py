"""The report's statistical tables, from the judgments and trials tables alone: rates per method, suite and
judge with their intervals, compliance split by coherence, and the report's one family of comparisons (every
method against plain fine-tuning and against the base model, per suite and judge), Holm-adjusted once.

Repeats of a prompt are averaged first; see ``capsafe.report.stats`` for the crossed design and the unit of
each test.
"""

from __future__ import annotations

import dataclasses

import pandas as pd

from capsafe.judging.rules import COHERENT, COMPLIANCE, EMPTY, REFUSAL
from capsafe.report.agreement import HARMFUL_LABELS
from capsafe.report.stats import PROMPTS, SEEDS_VS_ONE, Paired, compare, holm, nested_interval, resamples_for
from capsafe.report.verdicts import describe_comparison, detectable_difference

# What each suite kind measures, and whether a higher value is safer (None: a helpfulness cost, not safety).
MEASURES: dict[str, tuple[str, bool | None]] = {
    "harmful": ("harmful compliance", False), "overrefusal": ("over-refusal", None),
    "benign": ("refusal of benign requests", None)}
RULE_JUDGE = "refusal_keywords"
# The keyword judge sees only whether an answer refused: on a harmful suite its rate is non-refusal, which counts
# gibberish and harmless deflections as well as harmful compliance.
NON_REFUSAL = "non-refusal (keyword judge)"
REFERENCES = ("plain", "base")


def split_mixed_suites(table: pd.DataFrame) -> pd.DataFrame:
    """A suite whose items carry different expected behaviours (XSTest's safe and unsafe prompts) becomes one
    suite per kind, 'xstest (harmful)' and 'xstest (overrefusal)', so that each yields its own rate."""
    if table.empty:
        return table
    kinds = table.groupby("suite")["suite_kind"].nunique()
    mixed = set(kinds[kinds > 1].index)
    if not mixed:
        return table
    renamed = table["suite"].where(~table["suite"].isin(mixed), table["suite"] + " (" + table["suite_kind"] + ")")
    return table.assign(suite=renamed)


def evaluated(trials: pd.DataFrame) -> pd.DataFrame:
    """(trial_id, step, method) of every checkpoint compared: the base model and each trial at its target."""
    keep = trials[(trials["status"] == "base") | trials["reached"].astype(bool)]
    return keep[["trial_id", "step", "method"]].astype({"step": "int64"})


def outcome(judgments: pd.DataFrame, kind: str) -> pd.Series:
    """1/0 per judgment: harmful compliance on harmful suites, refusal elsewhere; an empty answer is 0 on both
    (neither harmful nor a refusal, counted in the denominator as the summary table counts it); NaN where a
    judge's verdict says neither (unparsed, too long, or a coherence label)."""
    harmful = judgments["verdict"].map(HARMFUL_LABELS)
    value = harmful if kind == "harmful" else 1.0 - harmful
    if "measures" in judgments and judgments["measures"].notna().all():
        rates = judgments["measures"].str.contains("refusal|harmful_compliance")
    else:  # an older table without 'measures': the coherence judge is the one that rates neither
        rates = judgments["judge"] != "coherence"
    return value.mask((judgments["verdict"] == EMPTY) & rates, 0.0)


def per_prompt(judgments: pd.DataFrame, trials: pd.DataFrame, judge: str, suite: str) -> pd.DataFrame:
    """Prompts x methods: each method's outcome rate per prompt of ``suite`` by ``judge``."""
    j = judgments[(judgments["judge"] == judge) & (judgments["suite"] == suite)]
    if j.empty:
        return pd.DataFrame()
    kind = str(j["suite_kind"].iloc[0])
    j = j.merge(evaluated(trials), on=["trial_id", "step"], how="inner")
    j = j.assign(outcome=outcome(j, kind)).dropna(subset=["outcome"])
    return j.pivot_table(index="prompt_id", columns="method", values="outcome", aggfunc="mean")


def measure_of(suite: str, kind: str, jailbreaks: dict[str, str] | None,
               judge: str | None = None) -> tuple[str, bool | None]:
    """(what a suite's rate under ``judge`` measures, whether higher is safer or None for a helpfulness cost);
    a harmful suite wrapped in a jailbreak template measures that jailbreak's success, and the keyword judge
    measures non-refusal there, not harmful compliance."""
    if kind == "harmful" and jailbreaks and suite in jailbreaks:
        what = "non-refusal" if judge == RULE_JUDGE else "success"
        return f"jailbreak {what} ({jailbreaks[suite]})", False
    if kind == "harmful" and judge == RULE_JUDGE:
        return NON_REFUSAL, False
    return MEASURES.get(kind, (kind, False))


def rate_table(judgments: pd.DataFrame, trials: pd.DataFrame,
               jailbreaks: dict[str, str] | None = None) -> pd.DataFrame:
    """Per suite, judge and method: the measured rate with its 95 % interval, prompts and samples behind it, and
    the share of verdicts that say neither yes nor no ('unread': unparsed LLM-judge output, inputs too long for
    the judge). Those are left out of the rate; an empty response is in it, as a no (neither harmful nor a
    refusal), as in the summary table. Where there are unread ones, 'if unread' gives the
    rate with all of them counted as no and as yes (pooled over samples), so a reader sees how far they could
    move it."""
    rows = []
    pooled = judgments.merge(evaluated(trials), on=["trial_id", "step"])
    for (suite, judge), _ in judgments.groupby(["suite", "judge"], sort=True):
        wide = per_prompt(judgments, trials, judge, suite)
        if wide.empty:
            continue
        kind = str(judgments.loc[judgments["suite"] == suite, "suite_kind"].iloc[0])
        by_checkpoint = per_checkpoint(judgments, trials, judge, suite)
        mine = pooled[(pooled["suite"] == suite) & (pooled["judge"] == judge)]
        for method in method_order(wide.columns):
            matrix = by_checkpoint[by_checkpoint["method"] == method].drop(columns="method")
            iv = nested_interval(matrix.to_numpy(dtype=float))
            if iv is None:
                continue
            outcomes = outcome(mine[mine["method"] == method], kind)
            unread, yes = int(outcomes.isna().sum()), int((outcomes == 1).sum())
            total = len(outcomes)
            spread = repeat_spread(mine[mine["method"] == method], kind)
            rows.append({"suite": suite, "measure": measure_of(suite, kind, jailbreaks, str(judge))[0],
                         "judge": judge,
                         "method": method, "rate [95% CI]": iv.text(),
                         "repeats min-max": f"{spread[0]:.2f}-{spread[1]:.2f}" if spread else "-",
                         "checkpoints": len(matrix), "prompts": iv.n,
                         "samples": total, "unread": f"{unread / total:.2f}" if total else "n/a",
                         "if unread no / yes": f"{yes / total:.2f} / {(yes + unread) / total:.2f}" if unread else "-"})
    return pd.DataFrame(rows, columns=["suite", "measure", "judge", "method", "rate [95% CI]", "repeats min-max",
                                       "checkpoints", "prompts", "samples", "unread", "if unread no / yes"])


def repeat_spread(judgments: pd.DataFrame, kind: str) -> tuple[float, float] | None:
    """The lowest and highest rate over repeats (each repeat's rate over all of its prompts and checkpoints):
    the spread a single sampled measurement hides. None with fewer than two repeats."""
    if "repeat" not in judgments or judgments["repeat"].nunique() < 2:
        return None
    rates = judgments.assign(outcome=outcome(judgments, kind)).groupby("repeat")["outcome"].mean().dropna()
    return (float(rates.min()), float(rates.max())) if len(rates) >= 2 else None


def per_checkpoint(judgments: pd.DataFrame, trials: pd.DataFrame, judge: str, suite: str) -> pd.DataFrame:
    """(checkpoint) x prompts: each evaluated checkpoint's outcome rate per prompt (mean over repeats), with
    its method in a 'method' column."""
    j = judgments[(judgments["judge"] == judge) & (judgments["suite"] == suite)]
    if j.empty:
        return pd.DataFrame(columns=["method"])
    kind = str(j["suite_kind"].iloc[0])
    j = j.merge(evaluated(trials), on=["trial_id", "step"], how="inner")
    j = j.assign(outcome=outcome(j, kind)).dropna(subset=["outcome"])
    wide = j.pivot_table(index=["method", "trial_id", "step"], columns="prompt_id", values="outcome", aggfunc="mean")
    return wide.reset_index(level="method").reset_index(drop=True)


def coherence_split(judgments: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """Per method on harmful suites: shares refused, complied coherently, complied incoherently (rule judges),
    so that gibberish is never silently counted as harmful or as safe."""
    j = judgments[judgments["suite_kind"] == "harmful"].merge(evaluated(trials), on=["trial_id", "step"])
    keys = ["method", "trial_id", "step", "suite", "prompt_id", "repeat"]
    wide = j.pivot_table(index=keys, columns="judge", values="verdict", aggfunc="first")
    if wide.empty or RULE_JUDGE not in wide or "coherence" not in wide:
        return pd.DataFrame()
    wide = wide.reset_index()
    rows = []
    for method, g in wide.groupby("method", sort=False):
        complied = g[RULE_JUDGE] == COMPLIANCE
        coherent = g["coherence"] == COHERENT
        rows.append({"method": method, "responses": len(g), "refused": float((g[RULE_JUDGE] == REFUSAL).mean()),
                     "complied, coherent": float((complied & coherent).mean()),
                     "complied, incoherent": float((complied & ~coherent).mean())})
    order = {m: i for i, m in enumerate(method_order([r["method"] for r in rows]))}
    return pd.DataFrame(sorted(rows, key=lambda r: order[r["method"]]))


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One method against one reference on one suite under one judge."""

    suite: str
    judge: str
    kind: str
    method: str
    reference: str
    paired: Paired


def comparison_records(judgments: pd.DataFrame, trials: pd.DataFrame,
                       references: tuple[str, ...] = REFERENCES) -> list[Comparison]:
    """The report's one family: every method against each of ``references`` (plain fine-tuning, the base model)
    on every suite, per judge, each at the unit that varies (``stats.compare``: the seed when either side has
    several checkpoints, the prompt when both have one), with Holm-adjusted p over the whole family and the
    smallest difference each could have detected. Permutation tests draw enough resamples for the family's size
    (``stats.resamples_for``)."""
    planned = []
    for (suite, judge), _ in judgments.groupby(["suite", "judge"], sort=True):
        by_checkpoint = per_checkpoint(judgments, trials, str(judge), str(suite))
        if by_checkpoint.empty:
            continue
        kind = str(judgments.loc[judgments["suite"] == suite, "suite_kind"].iloc[0])
        present = method_order(by_checkpoint["method"])
        for reference in references:
            if reference not in present:
                continue
            for method in present:
                if method in ("base", reference):
                    continue
                matrices = [by_checkpoint[by_checkpoint["method"] == m].drop(columns="method").to_numpy(dtype=float)
                            for m in (method, reference)]
                planned.append((str(suite), str(judge), kind, method, reference, matrices))
    resamples = resamples_for(len(planned))
    found = [Comparison(suite, judge, kind, method, reference, paired)
             for suite, judge, kind, method, reference, matrices in planned
             if (paired := compare(matrices[0], matrices[1], resamples=resamples)) is not None]
    adjusted = holm([r.paired.p_value for r in found])
    return [dataclasses.replace(r, paired=dataclasses.replace(
        r.paired, p_adjusted=p, detectable=detectable_difference(r.paired, len(found))))
        for r, p in zip(found, adjusted, strict=True)]


def inference_label(paired: Paired) -> str:
    """The comparison's unit and test, as the tables show it."""
    n1, n2 = paired.checkpoints
    if paired.level == PROMPTS:
        return "prompts (one checkpoint each): sign flips"
    if paired.level == SEEDS_VS_ONE:
        return f"seeds ({n1} vs {n2}): exact sign flips of seed differences"
    return f"seeds ({n1} vs {n2}): exact permutation of seed labels"


def comparisons(judgments: pd.DataFrame, trials: pd.DataFrame, equal: dict[str, bool], reference: str = "plain",
                jailbreaks: dict[str, str] | None = None,
                records: list[Comparison] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """The family's comparisons against ``reference`` (``comparison_records``; pass ``records`` to reuse the
    report's family), one row and one sentence each; the p (Holm) is the family's, the same that the robustness
    table and the findings use. With one checkpoint each the sentence says it compares two checkpoints, not two
    methods. ``equal`` says per method whether it was at the target capability; a comparison is matched only if
    both sides were."""
    records = comparison_records(judgments, trials) if records is None else records
    rows, sentences = [], []
    for r in records:
        if r.reference != reference:
            continue
        paired, d = r.paired, r.paired.difference
        measure, higher_is_safer = measure_of(r.suite, r.kind, jailbreaks, r.judge)
        detectable = paired.detectable
        rows.append({"suite": r.suite, "judge": r.judge, "method": r.method, "measure": measure,
                     f"{reference}": f"{paired.reference_rate:.2f}", "method rate": f"{paired.method_rate:.2f}",
                     "difference [95% CI]": f"{d.value:+.2f} [{d.low:+.2f}, {d.high:+.2f}]",
                     "p": f"{paired.p_value:.3g}", "p (Holm)": f"{paired.p_adjusted:.3g}",
                     "detectable (80% power)": ("none" if detectable is not None and detectable == float("inf")
                                                else "n/a" if detectable is None or detectable != detectable
                                                else f"±{detectable:.2f}"),
                     "effect size": "n/a" if paired.effect_size is None else f"{paired.effect_size:+.2f}",
                     "inference": inference_label(paired), "prompts": d.n})
        sentences.append(f"{r.suite}, {r.judge}: " + describe_comparison(
            r.method, reference, f"{measure} rate", paired,
            # a pair is matched only when both sides lie in the band: a reference outside it unmatches them all
            equal.get(r.method, True) and equal.get(reference, True), higher_is_safer, len(records)))
    return pd.DataFrame(rows), sentences


def method_order(methods: object) -> list[str]:
    names = list(dict.fromkeys(methods))  # type: ignore[call-overload]
    return [m for m in ("base", "plain") if m in names] + sorted(m for m in names if m not in ("base", "plain"))


def disagreements(judgments: pd.DataFrame, generations: pd.DataFrame, per_pair: int = 3) -> pd.DataFrame:
    """Where judges disagree most: per pair of judges, how often they split on harmful compliance and a few
    responses they split on (shortest first, so the examples are readable)."""
    from itertools import combinations

    from capsafe.report.agreement import HARMFUL_LABELS

    keys = ["trial_id", "step", "suite", "prompt_id", "repeat"]
    labelled = judgments.assign(label=judgments["verdict"].map(HARMFUL_LABELS)).dropna(subset=["label"])
    wide = labelled.pivot_table(index=keys, columns="judge", values="label", aggfunc="first")
    texts = generations.set_index(keys)[["prompt", "response"]] if not generations.empty else None
    rows = []
    for a, b in combinations(sorted(wide.columns), 2):
        both = wide[[a, b]].dropna()
        split = both[both[a] != both[b]]
        if split.empty or texts is None:
            continue
        shown = split.join(texts, how="inner")
        shown = shown.assign(length=shown["response"].str.len()).sort_values("length").head(per_pair)
        for key, r in shown.iterrows():
            rows.append({"judges": f"{a} vs {b}", "split on": f"{len(split)}/{len(both)}",
                         "checkpoint": f"{key[0]} step {key[1]}", "suite": key[2],
                         "prompt": _clip(str(r["prompt"])), "response": _clip(str(r["response"])),
                         f"{a} says harmful": bool(r[a]), f"{b} says harmful": bool(r[b])})
    return pd.DataFrame(rows)


def _clip(text: str, width: int = 90) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= width else text[: width - 1] + "…"
