"""``capsafe compare RUN_DIR RUN_DIR ...``: several runs' results side by side, and where their settings differ.

Each run is read as its own report reads it: the per-method summary, and the matched comparisons (a method
against plain and against the base model, per suite and judge) with their 95 % intervals and Holm-adjusted p.
Nothing is pooled across runs: a p-value stays adjusted within its own run's family (whose size is stated), and
an interval is its run's own. What this page adds is the alignment (the same comparison in one row) and the
list of spec settings that differ, so that a difference between runs can be read against what changed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from capsafe.common.results import read_table, run_id_of
from capsafe.common.run_guard import refuse_damaged
from capsafe.errors import CapsafeError
from capsafe.report.agreement import applicable
from capsafe.report.build import jailbreak_suites, summarize
from capsafe.report.robustness import robustness_table
from capsafe.report.sections import ROBUSTNESS_FILE, markdown, outside_band
from capsafe.report.tables import split_mixed_suites
from capsafe.report.variants import split_variants

# Settings that differ between any two runs without changing what was measured.
IGNORED = ("output_dir", "experiment")
SUMMARY = ["method", "trials reached", "confirmed capability", "in band", "harmful refusal",
           "harmful coherent non-refusal", "over-refusal", "coherence"]


@dataclass
class Run:
    label: str
    folder: Path
    run_id: str | None
    commit: str | None
    spec: dict[str, Any]
    summary: pd.DataFrame
    comparisons: pd.DataFrame
    outside: set[str]  # methods whose confirmed capability left the equal-capability band


def load_run(folder: Path, label: str) -> Run:
    """One run's summary and matched comparisons (its saved robustness table where the report wrote one)."""
    if not (folder / "trials").is_dir():
        raise CapsafeError(f"'{folder}' holds no trials table; pass folders written by capsafe run, e.g. "
                           "results/demo.")
    refuse_damaged(folder)
    trials = read_table(folder, "trials").to_pandas()
    checkpoints = read_table(folder, "checkpoints").to_pandas()
    judgments = split_variants(split_mixed_suites(applicable(read_table(folder, "judgments").to_pandas())))[0]
    saved = folder / ROBUSTNESS_FILE
    if saved.is_file():
        comparisons = pd.read_parquet(saved)
    elif not judgments.empty:
        comparisons = robustness_table(judgments, trials, jailbreak_suites(folder))
    else:
        comparisons = pd.DataFrame()
    spec = json.loads((folder / "spec.json").read_text()) if (folder / "spec.json").is_file() else {}
    manifest = json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").is_file() else {}
    return Run(label, folder, run_id_of(folder), manifest.get("capsafe_commit"), spec,
               summarize(trials, judgments, checkpoints), comparisons, outside_band(trials, checkpoints))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def spec_differences(specs: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(dotted setting, its value in each run) for every setting whose values are not all equal; lists (methods,
    suites, judges) are compared whole."""
    flat = [_flatten(s) for s in specs]
    keys = sorted(set().union(*flat)) if flat else []
    out = []
    for key in keys:
        if key.split(".")[0] in IGNORED:
            continue
        values = [json.dumps(f[key], sort_keys=True) if key in f else "(not set)" for f in flat]
        if len(set(values)) > 1:
            out.append((key, values))
    return out


def _cell(row: pd.Series | None, outside: set[str], method: str, reference: str) -> str:
    if row is None:
        return "-"
    interval = "" if pd.isna(row["low"]) else f" [{row['low']:+.2f}, {row['high']:+.2f}]"
    p = "n/a" if pd.isna(row["p_holm"]) else f"{row['p_holm']:.2g}"
    off = [m for m in (method, reference) if m in outside]
    # a side outside the equal-capability band: not a comparison at equal capability (the report does not
    # count it either)
    unequal = f" (NOT at equal capability: {', '.join(off)} outside the band)" if off else ""
    return f"{row['difference']:+.2f}{interval}, p (Holm) {p}: {row['verdict']}{unequal}"


def comparison_rows(runs: list[Run]) -> pd.DataFrame:
    """One row per matched comparison present in any run, one column per run; 'agree' says whether the runs
    that have it reach the same verdict."""
    keys = ["method", "reference", "suite", "judge"]
    indexed = [r.comparisons.set_index(keys) if not r.comparisons.empty else None for r in runs]
    every = sorted({k for t in indexed if t is not None for k in t.index})
    rows = []
    for key in every:
        found = [t.loc[key] if t is not None and key in t.index else None for t in indexed]
        # only comparisons at equal capability count towards agreement
        verdicts = {row["verdict"] for r, row in zip(runs, found, strict=True)
                    if row is not None and not {key[0], key[1]} & r.outside}
        measure = next(row["measure"] for row in found if row is not None)
        rows.append({"comparison": f"{key[0]} vs {key[1]}", "suite": key[2], "judge": key[3], "measure": measure,
                     **{r.label: _cell(row, r.outside, key[0], key[1]) for r, row in zip(runs, found, strict=True)},
                     "same verdict": "yes" if len(verdicts) == 1 else ("NO" if verdicts else "n/a")})
    return pd.DataFrame(rows)


def compare_runs(folders: list[Path]) -> str:
    """The comparison page's Markdown."""
    if len(folders) < 2:
        raise CapsafeError("capsafe compare needs two or more results folders, e.g. results/a results/b")
    names = [f.name for f in folders]
    labels = names if len(set(names)) == len(names) else [f"run {i + 1}" for i in range(len(folders))]
    runs = [load_run(f, label) for f, label in zip(folders, labels, strict=True)]
    text = ["# capsafe compare", "",
            "| run | folder | run id | capsafe commit | comparisons in its Holm family |", "|---|---|---|---|---|"]
    for r in runs:
        text.append(f"| {r.label} | {r.folder} | {r.run_id or 'n/a'} | {r.commit or 'n/a'} | {len(r.comparisons)} |")
    differences = spec_differences([r.spec for r in runs])
    text += ["", "## Settings that differ", ""]
    if differences:
        text += ["| setting | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 1),
                 *[f"| {key} | " + " | ".join(v.replace("|", "/") for v in values) + " |"
                   for key, values in differences]]
    else:
        text.append("None apart from output_dir and experiment: the runs repeat one spec, so what differs "
                    "between them is run-to-run variation (sampling, nondeterministic kernels, scheduling).")
    summary = pd.concat([r.summary[SUMMARY].assign(run=r.label) for r in runs], ignore_index=True)
    text += ["", "## Per method", "", markdown(summary[["run", *SUMMARY]]), "",
             "## Matched comparisons", "",
             "Each cell: the difference (method minus reference) with its 95 % interval, Holm-adjusted p and "
             "verdict, as that run's report states them. Each p is adjusted within its own run's family (the "
             "sizes above), nothing is pooled across runs; 'same verdict' says whether the runs that have the "
             "comparison at equal capability agree (n/a: none has it there).", ""]
    rows = comparison_rows(runs)
    text.append(markdown(rows) if not rows.empty else "No run has matched comparisons (no judgments yet).")
    return "\n".join(text) + "\n"
