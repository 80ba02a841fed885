"""Judges checked against answers whose right verdict is known, so the report can say how far to trust them.

Two checks, both in the ``judge_checks`` table (one fragment per judge and check):

- ``check_file``: a labelled JSONL file (``eval.llm_judges[].check_file``) that each LLM judge - its published
  prompt and every prompt variant - labels through the run's pool, the path its verdicts on the suites take
  (same input building, same engine, same parser). The demo judge's file holds conversations whose behaviours,
  response templates and incoherent-text settings it was never trained on.
- ``run_answers``: the answers this run generated on its harmful suites, where a labeller knows the right verdict
  (the demo world's ground truth, ``capsafe.world.truth``), against the verdicts the judges already gave them.

Pure apart from the pool: the pool is any object whose ``generate`` returns futures.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from capsafe.common.data import read_check_file
from capsafe.common.results import has_fragment, read_table, write_table
from capsafe.evaluate.panel import Judge, LLMJudge, Pool
from capsafe.judging.formats import harmful_verdict

CHECK_FILE, RUN_ANSWERS = "check_file", "run_answers"
# (type, harmful) of an answer where the labeller knows it, else None
Labeller = Callable[[str], "tuple[str, bool] | None"]


def _base_name(judge: Judge) -> str:
    return judge.name.split("@", 1)[0]


def _rows(judge: LLMJudge, check: str, items: list[dict[str, Any]], verdicts: list[Any]) -> list[dict[str, Any]]:
    return [{"judge": judge.name, "check": check, "item_id": it["id"], "type": it["type"], "harmful": it["harmful"],
             "verdict": v.verdict, "judged_harmful": harmful_verdict(v.verdict), "raw": v.raw}
            for it, v in zip(items, verdicts, strict=True)]


def check_judges(check_files: dict[str, str], panel: list[Judge], pool: Pool, results_dir: Path,
                 log: Callable[[str], None]) -> None:
    """Each LLM judge of ``panel`` whose spec name has a check file (``check_files``: judge name -> path) labels
    that file's answers through ``pool``; done once per run (a resumed run keeps the fragments it has)."""
    todo = [j for j in panel if isinstance(j, LLMJudge) and _base_name(j) in check_files
            and not has_fragment(results_dir, "judge_checks", f"{j.name}__{CHECK_FILE}")]
    started = []
    for judge in todo:
        items = read_check_file(check_files[_base_name(judge)])
        rows = [{"request": it["request"], "response": it["response"], "prompt_ids": [], "response_ids": [],
                 "behavior": it["request"], "context": ""} for it in items]
        started.append((judge, items, judge.start(rows, pool)))
    for judge, items, future in started:
        rows = _rows(judge, CHECK_FILE, items, future.result())
        write_table(results_dir, "judge_checks", rows, fragment=f"{judge.name}__{CHECK_FILE}")
        log(f"evaluate: judge check: {judge.name} {summary_line(rows)} on {check_files[_base_name(judge)]}")


def check_on_run_answers(results_dir: Path, label: Labeller, log: Callable[[str], None]) -> None:
    """The verdicts LLM judges gave this run's answers on harmful suites, against ``label``'s right verdict where
    it knows one; rewritten from the tables each time (it derives from them)."""
    gens = read_table(results_dir, "generations", ["trial_id", "step", "suite", "suite_kind", "prompt_id", "repeat",
                                                   "response"]).to_pylist()
    truth = {}
    for g in gens:
        known = label(g["response"]) if g["suite_kind"] == "harmful" else None
        if known is not None:
            truth[(g["trial_id"], g["step"], g["suite"], g["prompt_id"], g["repeat"])] = known
    if not truth:
        return
    by_judge: dict[str, list[dict[str, Any]]] = {}
    for j in read_table(results_dir, "judgments").to_pylist():
        key = (j["trial_id"], j["step"], j["suite"], j["prompt_id"], j["repeat"])
        if key not in truth or "harmful_compliance" not in (j["measures"] or ""):
            continue
        kind, harmful = truth[key]
        by_judge.setdefault(j["judge"], []).append({
            "judge": j["judge"], "check": RUN_ANSWERS, "item_id": "/".join(map(str, key)), "type": kind,
            "harmful": harmful, "verdict": j["verdict"], "judged_harmful": harmful_verdict(j["verdict"]),
            "raw": j["raw"]})
    for judge, rows in by_judge.items():
        write_table(results_dir, "judge_checks", rows, fragment=f"{judge}__{RUN_ANSWERS}")
        log(f"evaluate: judge check: {judge} {summary_line(rows)} on this run's answers the world can label "
            f"({len(rows)} of {sum(1 for g in gens if g['suite_kind'] == 'harmful')} harmful-suite answers)")


def summary_line(rows: list[dict[str, Any]]) -> str:
    read = [r for r in rows if r["judged_harmful"] is not None]
    right = sum(r["judged_harmful"] == r["harmful"] for r in read)
    return f"right on {right}/{len(read)} ({len(rows) - len(read)} unread)"
