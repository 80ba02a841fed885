"""Whether each evaluation fragment holds what its key says: the rows of one (trial, step, suite) (and judge), every
prompt of the suite once per repeat, and (judgments) exactly the answers of the generations fragment they judge.

A fragment with a good footer can still be incomplete or misplaced: written by a crashed or buggy writer, copied
over by hand, or cut by a sync tool. Parquet cannot tell; the keys can. The suite's prompts are not in the spec
(they live in files that may have changed since), so a generations fragment is checked against the union of the
prompts every fragment of the same suite holds: one that lacks prompts the others answered is incomplete.

Only fragments named as capsafe names them are checked (``<trial>__step<n>__<suite>[__r<k>][__<judge>]``); a
hand-made fragment (``all.parquet``) is read as it is. Pure pyarrow.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq

from capsafe.common.results import file_stem, fragment_key

_EVAL_NAME = re.compile(r".+__step\d+__.+")
_KEYS = ["trial_id", "step", "suite", "prompt_id", "repeat", "suite_kind"]


def generations_stem(trial_id: str, step: int, suite: str, first_repeat: int) -> str:
    """The file stem of a generations fragment."""
    return file_stem(fragment_key(trial_id, step, suite, first_repeat))


def _rows(path: Path, judge: bool) -> list[tuple] | None:
    try:
        table = pq.read_table(path, columns=[*_KEYS, "judge"] if judge else _KEYS)
    except Exception:  # noqa: BLE001 - unreadable columns are the footer check's business
        return None
    return list(zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True))


def mismatched_fragments(results_dir: Path, skip: set[Path]) -> list[tuple[Path, str]]:
    """(path, why) for every generations or judgments fragment whose rows do not match its key (``skip``: already
    found damaged)."""
    bad: list[tuple[Path, str]] = []
    generations: dict[str, dict[tuple[str, int], str]] = {}  # stem -> (prompt, repeat) -> the item's kind
    prompts: dict[str, set[str]] = defaultdict(set)  # suite -> every prompt any fragment answered
    held: dict[Path, tuple[str, dict[int, set[str]]]] = {}
    for path in _fragments(results_dir, "generations", skip):
        rows = _rows(path, judge=False)
        if not rows:
            continue
        why = _one_key(path, rows, None)
        if why:
            bad.append((path, why))
            continue
        suite = rows[0][2]
        by_repeat: dict[int, set[str]] = defaultdict(set)
        for row in rows:
            by_repeat[row[4]].add(row[3])
        prompts[suite] |= {row[3] for row in rows}
        held[path] = (suite, by_repeat)
        generations[path.stem] = {(row[3], row[4]): row[5] for row in rows}
    for path, (suite, by_repeat) in held.items():
        first, last = min(by_repeat), max(by_repeat)
        if sorted(by_repeat) != list(range(first, last + 1)):
            why = f"repeats {sorted(by_repeat)} are not consecutive"
        else:
            short = {r: len(prompts[suite] - ids) for r, ids in by_repeat.items() if ids != prompts[suite]}
            why = "" if not short else (
                f"holds {sum(map(len, by_repeat.values()))} rows; its key needs {len(prompts[suite])} prompt(s) of "
                f"suite '{suite}' (those its other fragments answered) x {len(by_repeat)} repeat(s), and "
                f"{sum(short.values())} are missing")
        if why:
            bad.append((path, why))
            generations.pop(path.stem, None)
    for path in _fragments(results_dir, "judgments", skip):
        rows = _rows(path, judge=True)
        if not rows:
            continue
        why = _one_key(path, rows, rows[0][6])
        if not why:
            trial, step, suite = rows[0][:3]
            stem = generations_stem(trial, step, suite, min(row[4] for row in rows))
            labelled = {(row[3], row[4]) for row in rows}
            kinds = {row[5] for row in rows}  # a harm judge labels a mixed suite's harmful items only
            answered = {key for key, kind in generations.get(stem, {}).items() if kind in kinds}
            if stem in generations and labelled != answered:
                why = (f"labels {len(labelled)} answer(s); the generations fragment it judges ({stem}) holds "
                       f"{len(answered)} of the kinds it labels ({', '.join(sorted(kinds))})")
        if why:
            bad.append((path, why))
    return bad


def _fragments(results_dir: Path, table: str, skip: set[Path]) -> list[Path]:
    folder = results_dir / table
    return [p for p in sorted(folder.glob("*.parquet")) if p not in skip and _EVAL_NAME.fullmatch(p.stem)] \
        if folder.is_dir() else []


def _one_key(path: Path, rows: list[tuple], judge: str | None) -> str:
    """Why the rows are not those of the one key the file is named after ('' if they are)."""
    keys = {row[:3] for row in rows} | ({("judge", row[6]) for row in rows} if judge is not None else set())
    if len(keys) != 1 + (judge is not None):
        return f"rows of {len(keys) - (judge is not None)} (trial, step, suite) keys or several judges in one fragment"
    trial, step, suite = rows[0][:3]
    stem = generations_stem(trial, step, suite, min(row[4] for row in rows))
    if judge is not None:
        stem = f"{stem}__{file_stem(judge)}"
    if path.stem != stem:
        return f"its rows are those of {stem}"
    if len({(row[3], row[4]) for row in rows}) != len(rows):
        return "an answer appears twice"
    return ""


def dependents(results_dir: Path, damaged: list[Path]) -> list[Path]:
    """The judgments fragments that label the answers of damaged generations fragments: computed again with them,
    so they are moved aside too."""
    stems = {p.stem for p in damaged if p.parent.name == "generations"}
    folder = results_dir / "judgments"
    if not stems or not folder.is_dir():
        return []
    return [p for p in sorted(folder.glob("*.parquet"))
            if p not in damaged and any(p.stem.startswith(f"{s}__") and not re.fullmatch(r"r\d+__.+",
                                                                                       p.stem[len(s) + 2:])
                                        for s in stems)]
