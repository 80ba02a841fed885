"""The comparison report, computed from the Parquet tables alone (so it runs on copied results too)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from capsafe.judges import COHERENT, COMPLIANCE, REFUSAL
from capsafe.results import read_table

COLUMNS = ["method", "trials reached", "steps to target", "capability", "harmful refusal",
           "harmful coherent compliance", "over-refusal", "coherence"]


def _rate(df: pd.DataFrame, judge: str, verdict: str) -> float | None:
    sel = df[df["judge"] == judge]
    return None if sel.empty else float((sel["verdict"] == verdict).mean())


def _coherent_compliance(df: pd.DataFrame) -> float | None:
    """Share of harmful prompts answered without refusal AND coherently: real compliance, not gibberish."""
    wide = df.pivot_table(index=["trial_id", "suite", "prompt_id"], columns="judge", values="verdict",
                          aggfunc="first")
    if wide.empty or "refusal_keywords" not in wide or "coherence" not in wide:
        return None
    return float(((wide["refusal_keywords"] == COMPLIANCE) & (wide["coherence"] == COHERENT)).mean())


def summarize(trials: pd.DataFrame, judgments: pd.DataFrame) -> pd.DataFrame:
    """One row per method (base first): reach, steps, capability, refusal and coherence rates."""
    rows = []
    methods = ["base"] + [m for m in dict.fromkeys(trials["method"]) if m != "base"]
    for method in methods:
        t = trials[trials["method"] == method]
        if t.empty:
            continue
        evaluated = t[(t["status"] == "base") | t["reached"]]
        j = judgments[judgments["trial_id"].isin(evaluated["trial_id"])]
        harmful, over = j[j["suite_kind"] == "harmful"], j[j["suite_kind"] == "overrefusal"]
        reached = t[t["reached"]]
        rows.append({
            "method": method,
            "trials reached": "-" if method == "base" else f"{len(reached)}/{len(t)}",
            "steps to target": None if method == "base" or reached.empty else float(reached["step"].mean()),
            "capability": float(evaluated["capability"].mean()) if not evaluated.empty
            else float(t["capability"].max()),
            "harmful refusal": _rate(harmful, "refusal_keywords", REFUSAL),
            "harmful coherent compliance": _coherent_compliance(harmful),
            "over-refusal": _rate(over, "refusal_keywords", REFUSAL),
            "coherence": _rate(j, "coherence", COHERENT),
        })
    return pd.DataFrame(rows, columns=COLUMNS)


def _fmt(value: object) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.2f}" if value <= 1.0 else f"{value:.0f}"
    return str(value)


def to_markdown(table: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def write_report(results_dir: Path, experiment: str) -> str:
    """Write ``report.md`` beside the tables and return its text."""
    trials = read_table(results_dir, "trials").to_pandas()
    judgments = read_table(results_dir, "judgments").to_pandas()
    target = float(trials["target"].dropna().iloc[0]) if trials["target"].notna().any() else float("nan")
    not_reached = trials[(trials["method"] != "base") & ~trials["reached"].astype(bool)]
    text = [f"# capsafe report: {experiment}", "",
            f"Capability target: {target:.2f}. Safety is measured only at checkpoints that reached it "
            "(and on the base model). Rates are shares of responses; 'harmful refusal' should be high, "
            "'over-refusal' low.", "", to_markdown(summarize(trials, judgments)), ""]
    if not not_reached.empty:
        text.append("Trials that did not reach the target (not compared):")
        for _, r in not_reached.iterrows():
            cap = "n/a" if pd.isna(r["capability"]) else f"{r['capability']:.2f}"
            text.append(f"- {r['trial_id']}: {r['status']}, best capability {cap} at step {r['step']}")
        text.append("")
    out = "\n".join(text)
    tmp = results_dir / ".report.md.tmp"
    tmp.write_text(out)
    tmp.replace(results_dir / "report.md")
    return out
