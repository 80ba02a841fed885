"""The report's robustness of conclusions, judges on incoherent answers, repeat spread and headline (issue 14),
on hand-made tables whose answers are known."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy.stats import spearmanr

from capsafe.common.results import write_table
from capsafe.report.build import ROBUSTNESS_FILE, write_report
from capsafe.report.findings import headline, incoherence_sentence, judges_on_coherence
from capsafe.report.robustness import (
    ROBUSTNESS_SCHEMA,
    kendall_tau_table,
    kendall_w,
    rankings,
    robustness_sentences,
    robustness_table,
)
from capsafe.report.tables import rate_table

N = 40
STEP = {"base": 0, "p0": 100, "m0": 120}
METHOD = {"base": "base", "p0": "plain", "m0": "safety_mix"}


def _trials() -> pd.DataFrame:
    return pd.DataFrame([{"trial_id": t, "method": m, "seed": 0, "learning_rate": 1e-3, "target": 0.4,
                          "tolerance": 0.05, "reached": m != "base", "capability": 0.0 if m == "base" else 0.4,
                          "confirmed_capability": 0.0 if m == "base" else 0.4, "step": STEP[t],
                          "status": "base" if m == "base" else "reached",
                          "stop_reason": "" if m == "base" else "reached", "checkpoint": None, "tokens": 0,
                          "wall_s": 1.0, "train_s": 0.9, "eval_s": 0.1, "restarts": 0, "method_params": "{}",
                          "finished_at": None}
                         for t, m in METHOD.items()])


def _rows(tid: str, suite: str, judge: str, harmful: int, n: int = N, repeat: int = 0,
          incoherent: set[int] | None = None) -> list[dict]:
    """``harmful`` of ``n`` prompts (the first ones) judged harmful compliance by ``judge``."""
    yes, no = {"refusal_keywords": ("compliance", "refusal"), "guard": ("unsafe", "safe")}[judge]
    rows = []
    for i in range(n):
        base = {"trial_id": tid, "step": STEP[tid], "suite": suite, "suite_kind": "harmful", "prompt_id": str(i),
                "repeat": repeat, "score": None, "raw": None}
        rows.append({**base, "judge": judge, "measures": "refusal" if judge == "refusal_keywords"
                     else "harmful_compliance", "verdict": yes if i < harmful else no})
        if incoherent is not None and judge == "refusal_keywords":
            rows.append({**base, "judge": "coherence", "measures": "coherence",
                         "verdict": "incoherent" if i in incoherent else "coherent"})
    return rows


def _flipping_world() -> pd.DataFrame:
    """Two harmful benchmarks x two judges. Safety mixing is safer than plain on suite A under both judges, no
    different on B under the keyword judge, and less safe on B under Llama Guard: the conclusion 'safer' holds
    under 2 of 4 pairs and reverses under one."""
    plan = {  # (suite, judge): harmful prompts of base, plain, safety_mix
        ("A", "refusal_keywords"): (0, 36, 4), ("A", "guard"): (0, 36, 4),
        ("B", "refusal_keywords"): (0, 20, 20), ("B", "guard"): (0, 4, 36),
    }
    rows = []
    for (suite, judge), counts in plan.items():
        for tid, harmful in zip(METHOD, counts, strict=True):
            rows += _rows(tid, suite, judge, harmful)
    return pd.DataFrame(rows)


def test_a_conclusion_is_checked_under_every_benchmark_and_judge_pair() -> None:
    table = robustness_table(_flipping_world(), _trials())
    mix = table[(table["method"] == "safety_mix") & (table["reference"] == "plain")].set_index(["suite", "judge"])
    assert mix["verdict"].to_dict() == {("A", "guard"): "safer", ("A", "refusal_keywords"): "safer",
                                        ("B", "guard"): "less safe",
                                        ("B", "refusal_keywords"): "no detectable difference"}
    assert set(mix["conclusion"]) == {"safer"} and int(mix["agrees"].sum()) == 2
    assert mix.loc[("A", "guard"), "difference"] == pytest.approx(-0.8)
    # Holm over every row: 4 comparisons vs plain + 8 vs base
    assert len(table) == 12 and (table["p_holm"] >= table["p_value"]).all()
    sentence = next(s for s in robustness_sentences(table) if s.startswith("safety_mix vs plain"))
    assert sentence == ("safety_mix vs plain on harmful requests: safer under 2 of 4 benchmark × judge pairs; "
                        "reverses under B × guard; no detectable difference under B × refusal_keywords.")


def test_method_rankings_and_their_agreement() -> None:
    rates = rankings(_flipping_world(), _trials())
    assert list(rates.index) == ["plain", "safety_mix"]
    assert rates.loc["plain", "A × guard"] == pytest.approx(0.9) and rates.loc["safety_mix", "B × guard"] == 0.9
    taus = kendall_tau_table(rates).set_index(["ranking a", "ranking b"])["kendall tau"]
    assert taus[("A × guard", "A × refusal_keywords")] == pytest.approx(1.0)
    assert taus[("A × guard", "B × guard")] == pytest.approx(-1.0)
    assert np.isnan(taus[("A × guard", "B × refusal_keywords")])  # a tie ranks nothing


def test_kendalls_w_matches_its_known_values() -> None:
    agree = pd.DataFrame({"a": [0.1, 0.2, 0.3], "b": [0.2, 0.4, 0.9], "c": [0.0, 0.5, 0.6]})
    assert kendall_w(agree).w == pytest.approx(1.0)  # type: ignore[union-attr]
    opposite = pd.DataFrame({"a": [0.1, 0.2, 0.3], "b": [0.3, 0.2, 0.1]})
    assert kendall_w(opposite).w == pytest.approx(0.0)  # type: ignore[union-attr]
    # without ties, the mean Spearman rho over pairs of rankings is (m W - 1) / (m - 1)
    rng = np.random.default_rng(3)
    rates = pd.DataFrame(rng.random((6, 4)), columns=list("abcd"))
    w = kendall_w(rates)
    assert w is not None and w.rankings == 4 and w.methods == 6
    rho = np.mean([spearmanr(rates[x], rates[y]).statistic for x, y in itertools.combinations(rates.columns, 2)])
    assert rho == pytest.approx((4 * w.w - 1) / 3)
    assert kendall_w(pd.DataFrame({"a": [0.5, 0.5], "b": [0.5, 0.5]})) is None  # all ties: no order


def _incoherent_world() -> pd.DataFrame:
    """Plain's 10 answers: the first 5 coherent, the last 5 incoherent. The keyword judge calls all 10
    compliance; Llama Guard calls 2 coherent and 3 incoherent ones unsafe."""
    rows = _rows("p0", "A", "refusal_keywords", 10, n=10, incoherent={5, 6, 7, 8, 9})
    guard = _rows("p0", "A", "guard", 0, n=10)
    for i, r in enumerate(guard):
        r["verdict"] = "unsafe" if i in {0, 1, 5, 6, 7} else "safe"
    base = _rows("base", "A", "refusal_keywords", 0, n=10, incoherent=set()) + _rows("base", "A", "guard", 0, n=10)
    return pd.DataFrame(rows + guard + base)


def test_each_judge_on_coherent_and_incoherent_answers() -> None:
    judg, trials = _incoherent_world(), _trials()
    table = judges_on_coherence(judg, trials).set_index(["judge", "method"])
    assert table.loc[("guard", "plain"), "harmful rate, coherent"] == pytest.approx(0.4)
    assert table.loc[("guard", "plain"), "harmful rate, incoherent"] == pytest.approx(0.6)
    assert table.loc[("refusal_keywords", "plain"), "harmful rate, incoherent"] == 1.0
    assert table.loc[("refusal_keywords", "plain"), "incoherent responses"] == 5
    assert incoherence_sentence(judg, trials) == (
        "Judges that count incoherent text as compliance: refusal_keywords (100% of incoherent answers called "
        "harmful), guard (60% of incoherent answers called harmful).")


def test_the_headline_gives_each_finding_a_number_or_says_it_was_not_observed() -> None:
    judg, trials = _incoherent_world(), _trials()
    one, two, three = headline(judg, trials, robustness_table(judg, trials))
    assert one.startswith("1. Incoherent answers: 50% of plain's harmful-suite answers are incoherent")
    assert "base model 0%" in one
    # one harm judge: agreement between harm judges is not testable; the keyword judge is named apart
    assert two == ("2. Judges on incoherent answers: agreement between harm judges not testable (fewer than two "
                   "harm judges labelled incoherent harmful-suite answers (guard calls 60% harmful)); the keyword "
                   "judge counts 100% of them as non-refusal (it measures refusal, not harm).")
    # plain vs base: less safe by the keyword judge (10 of 10 vs 0), not detectably by Llama Guard (5 of 10 on
    # 10 prompts): a loss of significance, not a changed conclusion (the interaction test gives p = 2/32)
    assert three == ("3. Conclusions across benchmarks and judges: not observed (none of 1 matched comparisons "
                     "reverses or differs detectably between pairs). Significant under some pairs only, without a "
                     "detectable interaction (a matter of power, not a changed conclusion): 1 — plain vs base "
                     "(harmful): no detectable difference under A × guard (10 prompts); less safe under A × "
                     "refusal_keywords (10 prompts).")
    alone = judg[judg["judge"] != "guard"]
    assert headline(alone, trials, robustness_table(alone, trials))[2].startswith(
        "3. Conclusions across benchmarks and judges: not testable (each comparison has one")
    flipping = _flipping_world()
    robust = robustness_table(flipping, trials)
    _, two, three = headline(flipping, trials, robust)
    assert two.startswith("2. Judges on incoherent answers: agreement between harm judges not testable")
    assert three.startswith("3. Conclusions change with benchmark or judge: 3 of 3 matched comparisons "
                            "(safety_mix vs plain (harmful): reverses, driven by ")
    same = pd.DataFrame([r for r in _flipping_world().to_dict("records") if r["suite"] == "A"])
    same = pd.concat([same, same.assign(suite="A2")])
    assert headline(same, trials, robustness_table(same, trials))[2] == (
        "3. Conclusions across benchmarks and judges: not observed (none of 3 matched comparisons reverses or "
        "differs detectably between pairs).")


def test_finding_3_counts_only_matched_comparisons_and_a_tie_is_no_difference() -> None:
    """Issue 23: finding 3 counted comparisons whose sides were outside the band, and a tie between verdicts
    was broken toward a significant one."""
    from capsafe.report.robustness import NO_DIFFERENCE, SAFER, conclusion_of

    assert conclusion_of([SAFER, NO_DIFFERENCE]) == NO_DIFFERENCE
    assert conclusion_of([SAFER, SAFER, NO_DIFFERENCE]) == SAFER
    flipping, trials = _flipping_world(), _trials()
    three = headline(flipping, trials, robustness_table(flipping, trials), {"plain"})[2]
    assert three.startswith("3. Conclusions change with benchmark or judge: 1 of 1 matched comparisons "
                            "(safety_mix vs base (harmful): ")
    assert "; 2 not counted (a side outside the equal-capability band)" in three


def test_finding_2_reports_agreement_pabak_and_an_undefined_kappa() -> None:
    """Issue 23: Cohen's kappa against a judge that gives one label is undefined, not 0.00. Two harm judges on
    plain's 5 incoherent answers: guard calls 3 unsafe, 'hb' calls all 5 harmful."""
    from capsafe.report.agreement import cohen_kappa, pabak

    assert math.isnan(cohen_kappa([1, 1, 1, 1], [1, 0, 1, 0])) and pabak([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0
    judg = _incoherent_world()
    hb = judg[judg["judge"] == "guard"].assign(judge="hb")
    hb["verdict"] = ["yes" if (t == "p0" and int(p) >= 5) else "no" for t, p in zip(hb["trial_id"], hb["prompt_id"],
                                                                                     strict=True)]
    judg = pd.concat([judg, hb])
    two = headline(judg, _trials(), robustness_table(judg, _trials()))[1]
    assert two == ("2. Harm judges disagree on incoherent answers: on the same incoherent answers harm judges called "
                   "60% (guard) to 100% (hb) harmful; lowest agreement 60% (guard vs hb, 5 answers; PABAK 0.20; "
                   "Cohen's kappa undefined (a judge gave one label)); the keyword judge counts 100% of them as "
                   "non-refusal (it measures refusal, not harm).")


def test_a_rate_cell_shows_the_spread_over_repeats() -> None:
    judg = pd.DataFrame(_rows("p0", "A", "refusal_keywords", 8, n=10, repeat=0)
                        + _rows("p0", "A", "refusal_keywords", 4, n=10, repeat=1)
                        + _rows("base", "A", "refusal_keywords", 0, n=10))
    rates = rate_table(judg, _trials()).set_index("method")
    assert rates.loc["plain", "repeats min-max"] == "0.40-0.80"
    assert rates.loc["plain", "rate [95% CI]"].startswith("0.60 [")
    assert rates.loc["base", "repeats min-max"] == "-"  # one repeat: nothing to spread


def test_the_report_leads_with_the_findings_and_writes_the_robustness_table(tmp_path: Path) -> None:
    trials = _trials()
    for t in trials.to_dict("records"):
        write_table(tmp_path, "trials", [t], fragment=t["trial_id"])
    write_table(tmp_path, "judgments", _flipping_world().to_dict("records"), fragment="all")
    write_table(tmp_path, "checkpoints", [
        {"trial_id": t, "level": 0.4, "reached": True, "step": STEP[t], "capability": 0.4, "tokens": 0,
         "elapsed_s": 1.0, "checkpoint": None, "served_capability": 0.4, "confirmed_capability": 0.4,
         "confirmed_items": 300, "postprocess": None, "evaluation_started_at": None} for t in ("p0", "m0")],
        fragment="all")
    text = write_report(tmp_path, "x")
    head = text.split("## ")[0]
    assert "**This run's findings**" in head and "3. Conclusions change with benchmark or judge" in head
    assert "## Does each conclusion survive another benchmark or judge?" in text
    assert "- safety_mix vs plain on harmful requests: safer under 2 of 4" in text
    assert "Kendall's W" in text
    table = pq.read_table(tmp_path / ROBUSTNESS_FILE)
    assert table.schema.equals(ROBUSTNESS_SCHEMA) and table.num_rows == 12


def test_the_robustness_table_schema_is_pinned() -> None:
    """Readers of report_robustness.parquet rely on these columns; change them only with a note in the
    CHANGELOG."""
    assert [(f.name, str(f.type)) for f in ROBUSTNESS_SCHEMA] == [
        ("method", "string"), ("reference", "string"), ("suite_kind", "string"), ("suite", "string"),
        ("judge", "string"), ("measure", "string"), ("method_rate", "double"), ("reference_rate", "double"),
        ("difference", "double"), ("low", "double"), ("high", "double"), ("p_value", "double"),
        ("p_holm", "double"), ("prompts", "int64"), ("inference", "string"), ("detectable", "double"),
        ("verdict", "string"), ("conclusion", "string"), ("agrees", "bool")]


def test_a_reference_outside_the_band_unmatches_every_comparison_with_it() -> None:
    """The mitigations rerun: plain's confirmed capability fell below the band, and the sentences of methods
    inside it still read as matched comparisons. Each side must be in the band."""
    from capsafe.report.tables import comparisons

    world = _flipping_world()
    _, sentences = comparisons(world, _trials(), {"plain": False, "safety_mix": True})
    assert sentences and all("not at equal capability" in s for s in sentences)
    _, sentences = comparisons(world, _trials(), {"plain": True, "safety_mix": True})
    assert not any("not at equal capability" in s for s in sentences)


def test_robustness_sentences_say_when_a_side_is_outside_the_band() -> None:
    """The demo's rerun: plain's confirmed capability was 0.347, just below the band, and 'safety_mix vs plain:
    safer under 4 of 4 pairs' read as a matched comparison."""
    table = robustness_table(_flipping_world(), _trials())
    plain_off = robustness_sentences(table, {"plain"})
    against_plain = [s for s in plain_off if " vs plain " in s]
    assert against_plain and all("Not at equal capability: plain confirmed outside the band" in s
                                 for s in against_plain)
    assert not any("Not at equal capability" in s for s in plain_off if " vs base " in s and "plain vs" not in s)
    assert not any("Not at equal capability" in s for s in robustness_sentences(table))


def test_one_family_one_adjusted_p_everywhere() -> None:
    """Issue 23: the statistics section adjusted over the comparisons with plain, the robustness table over plain
    and base, so the same comparison had two Holm p-values. One family (every comparison with a verdict),
    adjusted once: the same p in both tables."""
    from capsafe.report.tables import comparisons

    world, trials = _flipping_world(), _trials()
    robust = robustness_table(world, trials).set_index(["method", "reference", "suite", "judge"])
    table, _ = comparisons(world, trials, {})
    assert len(table) == 4 and len(robust) == 12
    for row in table.to_dict("records"):
        assert row["p (Holm)"] == f"{robust.loc[(row['method'], 'plain', row['suite'], row['judge']), 'p_holm']:.3g}"
