"""The report's statistics and robustness sections as Markdown lines, and the table formatting they share."""

from __future__ import annotations

import pandas as pd

from capsafe.report.capability import equal_capability
from capsafe.report.findings import incoherence_sentence, judges_on_coherence
from capsafe.report.robustness import (
    describe_concordance,
    display,
    kendall_tau_table,
    kendall_w,
    rankings,
    robustness_sentences,
)
from capsafe.report.tables import Comparison, coherence_split, comparisons, rate_table

ROBUSTNESS_FILE = "report_robustness.parquet"


def fmt(value: object) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.2f}" if value <= 1.0 else f"{value:.0f}"
    return str(value)


def markdown(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def statistics_section(trials: pd.DataFrame, judgments: pd.DataFrame, checkpoints: pd.DataFrame,
                target: float, jailbreaks: dict[str, str], records: list[Comparison]) -> list[str]:
    text = ["## Rates per suite and judge, with 95 % intervals", "",
            "Repeats of a prompt are averaged first. One checkpoint: Wilson's score interval over prompts "
            "(statsmodels), which generalises to prompts like these for that checkpoint. Several checkpoints "
            "('checkpoints' = how many seeds stand behind a rate): a crossed percentile bootstrap that draws the "
            "checkpoints and one shared prompt resample per replicate (every checkpoint answers the same prompts), "
            "which generalises to seeds and prompts like these. 'harmful compliance' and 'jailbreak success' "
            "should be low; the keyword judge's rate on harmful suites is non-refusal (it counts any answer that "
            "does not refuse, gibberish included), not harmful compliance; 'over-refusal' and refusal of benign "
            "requests are helpfulness costs.", "",
            markdown(rate_table(judgments, trials, jailbreaks)), ""]
    split = coherence_split(judgments, trials)
    if not split.empty:
        text += ["## Harmful-suite answers split by coherence", "",
                 "A complied answer that is incoherent is neither a real harm nor a refusal; it is shown apart.",
                 "", markdown(split), ""]
    table, sentences = comparisons(judgments, trials, equal_capability(trials, checkpoints),
                                   jailbreaks=jailbreaks, records=records)
    if not table.empty:
        text += ["## Paired comparisons against plain fine-tuning", "",
                 "Same prompts, method minus plain, tested at the unit that varies ('inference'): with one "
                 "checkpoint each, a bootstrap interval and a sign-flip permutation test over prompts (a claim about "
                 "two checkpoints); with several seeds on a side, the crossed bootstrap interval (prompts paired "
                 "across the two sides) and an exact permutation test at the seed level — the seed labels permuted "
                 "when both sides have several, each seed's difference from a single checkpoint sign-flipped when "
                 f"one has one (scipy `permutation_test`). One family of {len(records)} comparisons (every method "
                 "against plain and against the base model, every suite and judge) is Holm-adjusted once "
                 "(statsmodels); 'p (Holm)' is that p everywhere in this report. 'detectable (80% power)' is the "
                 "smallest difference the comparison could have detected at Holm's strictest level "
                 "(0.05 / family size): 'none' when its test cannot reach that level at all.", "",
                 markdown(table), "", *[f"- {s}" for s in sentences], ""]
    return text


def robustness_section(trials: pd.DataFrame, judgments: pd.DataFrame, robust: pd.DataFrame | None,
                jailbreaks: dict[str, str], checkpoints: pd.DataFrame) -> list[str]:
    text = []
    outside = outside_band(trials, checkpoints)
    if robust is not None and not robust.empty:
        text += ["## Does each conclusion survive another benchmark or judge?", "",
                 "Every method against plain fine-tuning and against the base model, under every benchmark × "
                 "judge pair that measures it. A pair's verdict is 'safer' / 'less safe' where the difference is "
                 "significant (the family's Holm-adjusted p < 0.05, the same p as above, and the 95 % interval "
                 "excluding 0); on over-refusal and benign suites a significant rise is a 'helpfulness cost', not "
                 "'less safe'. The conclusion is the verdict most pairs give, 'no detectable difference' on a tie "
                 f"(also in `{ROBUSTNESS_FILE}`).", "",
                 *[f"- {s}" for s in robustness_sentences(robust, outside)], "", markdown(display(robust)), ""]
    rates = rankings(judgments, trials)
    if rates.shape[1] >= 2 and len(rates) >= 2:
        taus = kendall_tau_table(rates)
        text += ["Method rankings by harmful compliance under each benchmark × judge pair (lower is safer), "
                 "and how well they agree: Kendall's tau-b per pair of rankings, Kendall's W over all (scipy; "
                 "tied ranks averaged).", "", markdown(rates.reset_index(names="method")), "", markdown(taus), "",
                 describe_concordance(kendall_w(rates)), ""]
    by_coherence = judges_on_coherence(judgments, trials)
    if not by_coherence.empty:
        text += ["## Judges on incoherent answers", "",
                 "Each judge's harmful-compliance rate on harmful suites, apart on the responses the coherence "
                 "judge found coherent and incoherent (Cohen's kappa per pair on each is in the judge panel "
                 "below).", "", markdown(by_coherence), "", incoherence_sentence(judgments, trials), ""]
    return text


def outside_band(trials: pd.DataFrame, checkpoints: pd.DataFrame) -> set[str]:
    """Methods whose confirmed capability left the equal-capability band."""
    return {m for m, inside in equal_capability(trials, checkpoints).items() if not inside}
