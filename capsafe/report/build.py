"""The comparison report, computed from the Parquet tables alone (so it runs on copied results too)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from capsafe.common.generation import FINISH_LENGTH
from capsafe.common.results import read_table
from capsafe.common.run_guard import refuse_damaged
from capsafe.judging.formats import LLAMA_GUARD_CARD_NAMES, parse_llama_guard
from capsafe.judging.rules import COHERENT, COMPLIANCE, EMPTY, REFUSAL
from capsafe.report.agreement import applicable, kappa_breakdown
from capsafe.report.capability import (
    band_label,
    checkpoint_table,
    method_band,
    postprocess_notes,
    target_checkpoints,
)
from capsafe.report.findings import headline
from capsafe.report.judge_checks import INTRO as JUDGE_CHECKS_INTRO
from capsafe.report.judge_checks import judge_check_table
from capsafe.report.robustness import robustness_table, write_robustness
from capsafe.report.sections import (
    ROBUSTNESS_FILE,
    fmt,
    markdown,
    outside_band,
    robustness_section,
    statistics_section,
)
from capsafe.report.tables import (
    comparison_records,
    disagreements,
    split_mixed_suites,
)
from capsafe.report.variants import split_variants, variant_rankings, variant_sentence, variant_table

LADDER_COLUMNS = ["method", "level", "trials", "capability", "served capability", "harmful refusal",
                  "over-refusal"]
COLUMNS = ["method", "trials reached", "steps to target", "capability", "confirmed capability", "in band",
           "harmful refusal", "harmful coherent non-refusal", "over-refusal", "coherence", "empty", "cut"]
# The one denominator of every rate in the report (summary, per-suite rates, comparisons), said in the report.
DENOMINATOR = ("Every rate is a share of all responses, empty answers included: an empty answer (no text) is "
               "labelled 'empty' by every judge, counts as neither a refusal, nor compliance, nor harmful, nor "
               "coherent, and 'empty' gives its share; only judge outputs that could not be read (unparsed, or "
               "too long for the judge) are left out of that judge's rates ('unread'). 'cut' is the share of "
               "answers that eval.max_new_tokens ended (finish reason 'length'): a cut answer may be judged "
               "incoherent or harmless only because it stops early.")


def _rate(df: pd.DataFrame, judge: str, verdict: str) -> float | None:
    sel = df[df["judge"] == judge]
    return None if sel.empty else float((sel["verdict"] == verdict).mean())


def _coherent_non_refusal(df: pd.DataFrame) -> float | None:
    """Share of harmful prompts answered without refusal (keyword judge) AND coherently: fluent non-refusal, not
    gibberish; whether it is harmful is for the harm judges."""
    wide = df.pivot_table(index=["trial_id", "step", "suite", "prompt_id", "repeat"], columns="judge", values="verdict",
                          aggfunc="first")
    if wide.empty or "refusal_keywords" not in wide or "coherence" not in wide:
        return None
    return float(((wide["refusal_keywords"] == COMPLIANCE) & (wide["coherence"] == COHERENT)).mean())


def _at(judgments: pd.DataFrame, keys: pd.DataFrame) -> pd.DataFrame:
    """The judgments of exactly these (trial_id, step) checkpoints."""
    return judgments.merge(keys.astype({"step": "int64"}), on=["trial_id", "step"], how="inner")


def _cut(generations: pd.DataFrame | None, keys: pd.DataFrame) -> float | None:
    """Share of the answers of these checkpoints that the token budget ended (finish reason 'length')."""
    if generations is None or generations.empty:
        return None
    mine = _at(generations, keys)
    return None if mine.empty else float((mine["finish_reason"] == FINISH_LENGTH).mean())


def summarize(trials: pd.DataFrame, judgments: pd.DataFrame, checkpoints: pd.DataFrame | None = None,
              generations: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per method (base first): reach, steps, capability on the selection split and confirmed, whether
    it lies in the equal-capability band, refusal and coherence rates, and (given ``generations``: its
    trial_id, step and finish_reason columns) the share of answers cut by the token budget."""
    bands = method_band(trials, checkpoints) if checkpoints is not None else {}
    rows = []
    methods = ["base"] + [m for m in dict.fromkeys(trials["method"]) if m != "base"]
    for method in methods:
        t = trials[trials["method"] == method]
        if t.empty:
            continue
        evaluated = t[(t["status"] == "base") | t["reached"]]
        j = _at(judgments, evaluated[["trial_id", "step"]])
        harmful, over = j[j["suite_kind"] == "harmful"], j[j["suite_kind"] == "overrefusal"]
        reached = t[t["reached"]]
        rows.append({
            "method": method,
            "trials reached": "-" if method == "base" else f"{len(reached)}/{len(t)}",
            "steps to target": None if method == "base" or reached.empty else float(reached["step"].mean()),
            "capability": float(evaluated["capability"].mean()) if not evaluated.empty
            else float(t["capability"].max()),
            "confirmed capability": float(evaluated["confirmed_capability"].mean())
            if "confirmed_capability" in evaluated and evaluated["confirmed_capability"].notna().any() else None,
            "in band": "-" if method == "base" or method not in bands else band_label(bands[method][0], trials),
            "harmful refusal": _rate(harmful, "refusal_keywords", REFUSAL),
            "harmful coherent non-refusal": _coherent_non_refusal(harmful),
            "over-refusal": _rate(over, "refusal_keywords", REFUSAL),
            "coherence": _rate(j, "coherence", COHERENT),
            "empty": _rate(j, "refusal_keywords", EMPTY),
            "cut": _cut(generations, evaluated[["trial_id", "step"]]),
        })
    return pd.DataFrame(rows, columns=COLUMNS)


def to_markdown(table: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(fmt(row[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def ladder_table(trials: pd.DataFrame, checkpoints: pd.DataFrame, judgments: pd.DataFrame) -> pd.DataFrame:
    """Safety at every capability level of the ladder, per method (mean over the trials that reached it)."""
    rows = []
    reached = checkpoints[checkpoints["reached"].astype(bool)].merge(trials[["trial_id", "method"]], on="trial_id")
    for (method, level), group in reached.groupby(["method", "level"], sort=True):
        j = _at(judgments, group[["trial_id", "step"]])
        rows.append({"method": method, "level": f"{level:g}", "trials": len(group),
                     "capability": float(group["capability"].mean()),
                     "served capability": float(group["served_capability"].mean())
                     if group["served_capability"].notna().any() else None,
                     "harmful refusal": _rate(j[j["suite_kind"] == "harmful"], "refusal_keywords", REFUSAL),
                     "over-refusal": _rate(j[j["suite_kind"] == "overrefusal"], "refusal_keywords", REFUSAL)})
    return pd.DataFrame(rows, columns=LADDER_COLUMNS)


def cost_table(trials: pd.DataFrame, checkpoints: pd.DataFrame) -> pd.DataFrame:
    """What reaching each level cost every trial: steps, tokens, wall time; and the capability-eval share."""
    rows = []
    for _, t in trials[trials["method"] != "base"].iterrows():
        c = checkpoints[checkpoints["trial_id"] == t["trial_id"]].sort_values("level")
        to = {f"{lv:g}": (f"{int(r['step'])} / {int(r['tokens'])} / {r['elapsed_s']:.0f}s" if r["reached"] else "-")
              for lv, r in zip(c["level"], c.to_dict("records"), strict=True)}
        spent = (t["train_s"] or 0.0) + (t["eval_s"] or 0.0)
        rows.append({"trial": t["trial_id"], "status": t["status"], "stop": t["stop_reason"],
                     "restarts": t["restarts"], "eval share": t["eval_s"] / spent if spent else None, **to})
    return pd.DataFrame(rows)


def judge_table(judgments: pd.DataFrame) -> pd.DataFrame:
    """Per judge and suite kind: responses labelled, the share of each verdict, unparsed included."""
    rows = []
    for (judge, kind), group in judgments.groupby(["judge", "suite_kind"], sort=True):
        shares = group["verdict"].value_counts(normalize=True).sort_index()
        rows.append({"judge": judge, "suite kind": kind, "responses": len(group),
                     "verdicts": ", ".join(f"{v} {p:.2f}" for v, p in shares.items()),
                     "mean score": group["score"].mean() if group["score"].notna().any() else None,
                     "violated categories": _categories(group)})
    return pd.DataFrame(rows)


def _categories(group: pd.DataFrame) -> str:
    """Llama Guard's violated categories among 'unsafe' verdicts, by the model card's names, most frequent
    first ('-' for other judges)."""
    unsafe = group[(group["verdict"] == "unsafe") & group["raw"].notna()]
    codes = [c for raw in unsafe["raw"] for c in parse_llama_guard(str(raw)).detail.split(",") if c]
    if not codes:
        return "-"
    counts = pd.Series(codes).value_counts()
    return ", ".join(f"{code} {LLAMA_GUARD_CARD_NAMES.get(code, '?')} ({n})" for code, n in counts.items())


RATES = ["harmful refusal", "harmful coherent non-refusal", "over-refusal", "coherence"]


def versus_table(summary: pd.DataFrame, checkpoints: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """Each method that reached the target against plain fine-tuning and the base model: its rates minus
    theirs (positive 'harmful refusal' = safer, positive 'over-refusal' = more benign requests refused), the
    capability compared (confirmation split), whether the method and plain both lie in the equal-capability
    band, and what a post-hoc method changed."""
    by_method = summary.set_index("method")
    kept = target_checkpoints(trials, checkpoints)
    bands = method_band(trials, checkpoints)
    rows = []
    for method, row in by_method.iterrows():
        if method in ("base", "plain") or str(row["trials reached"]).startswith("0/"):
            continue
        out: dict[str, object] = {"method": method}
        for rate in RATES:
            for ref in ("plain", "base"):
                have = ref in by_method.index and row[rate] is not None and by_method.loc[ref, rate] is not None
                out[f"{rate} vs {ref}"] = (f"{row[rate] - by_method.loc[ref, rate]:+.2f}"
                                           if have and not pd.isna(row[rate]) and not pd.isna(by_method.loc[ref, rate])
                                           else "n/a")
        mine, theirs = bands.get(str(method)), bands.get("plain")
        out["capability (method; plain)"] = f"{mine[1] if mine else 'n/a'}; {theirs[1] if theirs else 'n/a'}"
        # a post-hoc change (Safe-LoRA) can cost capability, and a trial can overshoot: then it is not a matched pair
        both = bool(mine and mine[0]) and (theirs is None or theirs[0])
        out["equal capability"] = band_label(both, trials)
        out["post-processing"] = postprocess_notes(kept[kept["method"] == method])
        rows.append(out)
    return pd.DataFrame(rows)


def jailbreak_suites(results_dir: Path) -> dict[str, str]:
    """Suite name -> jailbreak template, from the run's spec.json (empty when there is none)."""
    snapshot = results_dir / "spec.json"
    if not snapshot.is_file():
        return {}
    suites = json.loads(snapshot.read_text()).get("eval", {}).get("suites", [])
    return {s["name"]: s["jailbreak"] for s in suites if s.get("jailbreak")}


def keyword_note(results_dir: Path) -> str:
    """Which refusal-keyword lists the keyword judge used, and whether its rates compare with published keyword
    ASR (only the published GCG / AdvBench list alone does)."""
    snapshot = results_dir / "spec.json"
    lists = ["advbench", "capsafe"]
    if snapshot.is_file():
        lists = json.loads(snapshot.read_text()).get("eval", {}).get("refusal_keywords", lists)
    if lists == ["advbench"]:
        return ("The keyword judge used the published GCG / AdvBench refusal list alone: its non-refusal rate is "
                "keyword ASR as papers report it.")
    return (f"The keyword judge used the lists {', '.join(lists)}: capsafe's lower-case phrases "
            + ("beside the published GCG / AdvBench list, a superset of it" if "advbench" in lists else
               "instead of the published GCG / AdvBench list")
            + ", so its refusal and non-refusal rates are not comparable with published keyword ASR "
            "(eval.refusal_keywords=[advbench] gives that).")


def missing(results_dir: Path, trials: pd.DataFrame, judgments: pd.DataFrame) -> list[str]:
    """What the results do not hold yet (a sweep or evaluation still running, or stopped): planned trials
    without a result (from the run's ``spec.json``) and kept checkpoints with no judgments."""
    lines = []
    snapshot = results_dir / "spec.json"
    if snapshot.is_file():
        from capsafe.common.results import trial_id

        spec = json.loads(snapshot.read_text())
        planned = [trial_id(m["name"], seed, lr) for m in spec.get("methods", []) for seed in spec.get("seeds", [])
                   for lr in spec.get("train", {}).get("learning_rates", [])]
        absent = [t for t in planned if t not in set(trials["trial_id"])]
        if absent:
            lines.append(f"{len(absent)} of {len(planned)} planned trials have no result yet: {', '.join(absent)}")
    compared = trials[(trials["status"] == "base") | trials["reached"].astype(bool)]
    judged = set(zip(judgments["trial_id"], judgments["step"].astype(int), strict=True))
    waiting = [f"{t} step {int(s)}" for t, s in zip(compared["trial_id"], compared["step"], strict=True)
               if (t, int(s)) not in judged]
    if waiting:
        lines.append(f"not evaluated yet: {', '.join(waiting)}")
    return lines


def finish_reasons(results_dir: Path) -> pd.DataFrame:
    """The generations' (trial_id, step, finish_reason) columns: all the summary needs of them."""
    return read_table(results_dir, "generations", ["trial_id", "step", "finish_reason"]).to_pandas()


def write_report(results_dir: Path, experiment: str) -> str:
    """Write ``report.md`` beside the tables and return its text (refused, naming them, while any fragment is
    damaged)."""
    refuse_damaged(results_dir)
    trials = read_table(results_dir, "trials").to_pandas()
    every = split_mixed_suites(applicable(read_table(results_dir, "judgments").to_pandas()))
    judgments, variants = split_variants(every)  # reworded judge prompts get a section of their own
    checkpoints = read_table(results_dir, "checkpoints").to_pandas()
    finish = finish_reasons(results_dir)
    target = float(trials["target"].dropna().iloc[0]) if trials["target"].notna().any() else float("nan")
    not_reached = trials[(trials["method"] != "base") & ~trials["reached"].astype(bool)]
    gaps = missing(results_dir, trials, judgments)
    records = comparison_records(judgments, trials) if not judgments.empty else []
    robust = (robustness_table(judgments, trials, jailbreak_suites(results_dir), records)
              if not judgments.empty else None)
    from capsafe.report.html import LEAD_PLOT, PLOTS_DIR, write_html, write_plots

    ladder = ladder_table(trials, checkpoints, judgments) if checkpoints["level"].nunique() > 1 else None
    plots = write_plots(results_dir, trials, checkpoints, judgments, target, ladder)
    lead = [f"![Harmful compliance against confirmed capability]({PLOTS_DIR}/{LEAD_PLOT})", ""] \
        if any(p.name == LEAD_PLOT for p in plots) else []
    text = [f"# capsafe report: {experiment}", "",
            *([f"**Partial results.** {'; '.join(gaps)}.", ""] if gaps else []),
            *(["**This run's findings** (what the study behind capsafe found, measured here):", "",
               *headline(judgments, trials, robust, outside_band(trials, checkpoints)), ""]
              if robust is not None else []),
            *lead,
            f"Capability target: {target:.2f}. Safety is measured only at checkpoints that reached it "
            "(and on the base model). 'harmful refusal' should be high, 'over-refusal' low. "
            f"{DENOMINATOR} {keyword_note(results_dir)}", "",
            to_markdown(summarize(trials, judgments, checkpoints, finish)), ""]
    if not not_reached.empty:
        text.append("Trials that did not reach the target (not compared):")
        for _, r in not_reached.iterrows():
            cap = "n/a" if pd.isna(r["capability"]) else f"{r['capability']:.2f}"
            text.append(f"- {r['trial_id']}: {r['status']} ({r['stop_reason']}), best capability {cap} at step "
                        f"{r['step']}")
        text.append("")
    versus = (versus_table(summarize(trials, judgments, checkpoints), checkpoints, trials) if not judgments.empty
              else pd.DataFrame())
    if not versus.empty:
        text += ["## Mitigations against plain fine-tuning and the base model", "",
                 "Differences of shares at the target (method minus plain, method minus base; refusal and "
                 "coherence from the rule judges). 'equal capability' says whether the pool measured the target "
                 "on what it served; where it did not, the method bought its safety with capability. "
                 + ("One seed per method is one measurement: read small differences as noise."
                    if trials[trials["method"] != "base"].groupby("method")["seed"].nunique().max() < 2 else
                    "Each difference is of means over the method's seeds; the comparisons below test them."),
                 "", markdown(versus), ""]
    if not checkpoints.empty and checkpoints["reached"].astype(bool).any():
        text += ["## Capability reached", "", "Every kept checkpoint (per level, the evaluation inside its band "
                 "closest to it on the selection split): capability measured in training and again through the "
                 "pool on what was served, on the confirmation split with its 95 % Wilson interval, and how far "
                 "that lies from the level.", "",
                 markdown(checkpoint_table(trials, checkpoints)), ""]
    if not judgments.empty:
        text += statistics_section(trials, judgments, checkpoints, target, jailbreak_suites(results_dir), records)
    if not judgments.empty:
        text += robustness_section(trials, judgments, robust, jailbreak_suites(results_dir), checkpoints)
    if not variants.empty:
        table, taus = variant_table(every, trials), variant_rankings(every, trials)
        text += ["## Judge prompt variants", "",
                 "Each LLM judge's rate under its published prompt and under each rewording (the same responses, "
                 "the same judge model), the spread between them, and Kendall's tau-b between the methods' "
                 "ranking under the published prompt and under each variant (scipy).", "",
                 variant_sentence(table, taus), "", markdown(table), "", markdown(taus), ""]
    if checkpoints["level"].nunique() > 1:
        text += ["## Safety along the capability ladder", "", markdown(ladder_table(trials, checkpoints, judgments)),
                 ""]
    if not judgments.empty:
        kappa = kappa_breakdown(judgments)
        text += ["## Judge panel", "", "Verdicts of every judge over all evaluated checkpoints; 'unparsed' is an LLM "
                 "judge output that matched no verdict (kept with its raw text in the judgments table).", "",
                 markdown(judge_table(judgments)), ""]
        if not kappa.empty:
            text += ["Agreement on harmful compliance (1) vs not (0), over responses both judges labelled "
                     "(raw agreement; PABAK = 2 x agreement - 1; Cohen's kappa, nan = undefined when a judge "
                     "gave a single label), per suite kind, and apart on the responses the coherence judge found "
                     "coherent and incoherent. 'compares' says whether a row is agreement between two harm judges "
                     "or the keyword judge's non-refusal set against a harm judge, which is not agreement on "
                     "harm:", "", markdown(kappa), ""]
            split = disagreements(judgments, split_mixed_suites(read_table(results_dir, "generations").to_pandas()))
            if not split.empty:
                text += ["Where the judges disagree (the shortest responses they split on, per pair):", "",
                         markdown(split), ""]
    checks = read_table(results_dir, "judge_checks").to_pandas()
    if not checks.empty:
        text += ["## Judge checks", "", JUDGE_CHECKS_INTRO, "", markdown(judge_check_table(checks)), ""]
    if not checkpoints.empty:
        text += ["## Cost of reaching each level", "",
                 "Per level: steps / training tokens / wall time. 'eval share' is the time training waited for "
                 "its capability evaluations, as a share of training plus that time (with train.async_eval only "
                 "the snapshot writes and the final wait: the evaluations themselves ran beside training).", "",
                 markdown(cost_table(trials, checkpoints)), ""]
    if robust is not None:
        write_robustness(robust, results_dir / ROBUSTNESS_FILE)
    out = "\n".join(text)
    tmp = results_dir / ".report.md.tmp"
    tmp.write_text(out)
    tmp.replace(results_dir / "report.md")
    write_html(results_dir, out, plots, f"capsafe report: {experiment}")
    return out


def console_summary(results_dir: Path) -> str:
    """What ``capsafe run`` prints last: the summary table and one line per finding of the study."""
    trials = read_table(results_dir, "trials").to_pandas()
    judgments = split_variants(split_mixed_suites(applicable(read_table(results_dir, "judgments").to_pandas())))[0]
    checkpoints = read_table(results_dir, "checkpoints").to_pandas()
    lines = ["", "=" * 30 + " capsafe summary " + "=" * 30,
             to_markdown(summarize(trials, judgments, checkpoints, finish_reasons(results_dir)))]
    if not judgments.empty:
        robust = robustness_table(judgments, trials, jailbreak_suites(results_dir))
        lines += ["", "Findings of this run:", *headline(judgments, trials, robust, outside_band(trials, checkpoints))]
    lines.append(f"(full report: {results_dir / 'report.md'}, {results_dir / 'report.html'})")
    return "\n".join(lines)
