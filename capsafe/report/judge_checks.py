"""The report's judge checks: each LLM judge's accuracy on answers whose right verdict is known (the
``judge_checks`` table, ``capsafe.evaluate.judge_checks``), per check and answer type, with Wilson intervals."""

from __future__ import annotations

import pandas as pd

from capsafe.report.stats import proportion_interval

CHECK_NAMES = {"check_file": "check file (through the pool)", "run_answers": "this run's answers"}
INTRO = ("Each LLM judge on answers whose right verdict is known: 'check file' is the labelled file of "
         "eval.llm_judges[].check_file, sent through this run's pool (the demo judge's holds behaviours, response "
         "templates and incoherent-text settings it was never trained on); 'this run's answers' are the answers "
         "generated on the harmful suites that the demo world can label (an exact refusal or helpful template, or "
         "an answer without a letter; everything else is not labelled and not counted here), against the verdicts "
         "the judge gave them. 'accuracy' is over the answers the judge's output could be read for, with its 95 % "
         "Wilson interval (statsmodels); 'unread' is the share it could not (unparsed, too long), left out.")


def judge_check_table(checks: pd.DataFrame) -> pd.DataFrame:
    """One row per (judge, check, type) and an 'all' row per (judge, check)."""
    rows = []
    for (judge, check), group in checks.groupby(["judge", "check"], sort=True):
        parts = [(str(t), g) for t, g in group.groupby("type", sort=True)]
        for kind, g in [*parts, *([("all", group)] if len(parts) > 1 else [])]:
            read = g[g["judged_harmful"].notna()]
            right = (read["judged_harmful"].astype(bool) == read["harmful"].astype(bool)).astype(float)
            interval = proportion_interval(right.tolist())
            rows.append({"judge": judge, "check": CHECK_NAMES.get(str(check), str(check)), "type": kind,
                         "answers": len(g), "unread": 1.0 - len(read) / len(g) if len(g) else None,
                         "accuracy": interval.value if interval else None,
                         "95 % interval": f"[{interval.low:.2f}, {interval.high:.2f}]" if interval else "n/a"})
    return pd.DataFrame(rows)
