"""The one results schema. Every Parquet write in capsafe goes through ``write_table``.

Layout under ``<output_dir>/<experiment>/``: one folder per table (``trials/``, ``checkpoints/``,
``trajectory/``, ``generations/``, ``judgments/``, ``judge_checks/``), each a Parquet dataset of fragments.
Writes go to a temporary file that is renamed into place: a reader never sees half a file. Every row carries
the ``run_id`` of the run that wrote it (``manifest.json``'s), so tables of several runs stack without their
trial ids colliding; fragments written before schema 11 read it as null.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from capsafe.common.storage import push, remote_of

SCHEMA_VERSION = 11

_KEY = [("trial_id", pa.string()),       # 'base' or '<method>-s<seed>-lr<lr>'
        ("step", pa.int64())]            # the checkpoint's training step (0 for the base model)

SCHEMAS: dict[str, pa.Schema] = {
    "trials": pa.schema([
        ("trial_id", pa.string()),
        ("method", pa.string()),          # 'base', 'plain', 'safety_mix', ...
        ("seed", pa.int64()),
        ("learning_rate", pa.float64()),
        ("target", pa.float64()),
        ("tolerance", pa.float64()),      # half-width of the equal-capability band around the target
        ("reached", pa.bool_()),          # kept a checkpoint for the target (an in-band candidate, or the
                                          # evaluation that jumped over the band; see checkpoints)
        ("capability", pa.float64()),     # selection split, at the target checkpoint (or the best if not reached)
        ("confirmed_capability", pa.float64()),  # the target checkpoint on the confirmation split (null: none)
        ("step", pa.int64()),             # step of that checkpoint (0 for the base model)
        ("status", pa.string()),          # 'base', 'reached', 'not_reached', 'diverged', 'failed'
        ("stop_reason", pa.string()),     # 'reached', 'budget:steps|tokens|wall_time', 'diverged', 'error: ...'
        ("checkpoint", pa.string()),      # model directory of the target checkpoint (null if none)
        ("tokens", pa.int64()),           # training tokens seen when the trial stopped
        ("wall_s", pa.float64()),         # trial wall time, Ray overheads included
        ("train_s", pa.float64()),        # time in optimizer steps, summed over restarts
        ("eval_s", pa.float64()),         # time in capability evaluations, summed over restarts
        ("restarts", pa.int64()),         # worker-group restarts from a resume checkpoint
        ("method_params", pa.string()),   # JSON of the method's spec fields
        ("finished_at", pa.timestamp("us", tz="UTC")),  # when the driver recorded the trial (base: measured)
    ]),
    "checkpoints": pa.schema([            # one row per (trial, capability level of the ladder)
        ("trial_id", pa.string()),
        ("level", pa.float64()),
        ("reached", pa.bool_()),
        ("step", pa.int64()),             # the kept evaluation: the in-band candidate closest to the level (or,
                                          # with none, the one that jumped over the band); null if none
        ("capability", pa.float64()),     # as measured during training at that step
        ("tokens", pa.int64()),           # training tokens up to that step
        ("elapsed_s", pa.float64()),      # trial wall time up to that step
        ("checkpoint", pa.string()),      # directory with model/ (HF model or PEFT adapter)
        ("served_capability", pa.float64()),  # selection split, re-measured on what the evaluation pool serves
        ("confirmed_capability", pa.float64()),  # confirmation split, measured by the pool: what is compared
        ("confirmed_items", pa.int64()),  # confirmation items behind it (its interval's sample size)
        ("postprocess", pa.string()),  # JSON: what a post-hoc method did to the checkpoint (Safe-LoRA), or null
        ("evaluation_started_at", pa.timestamp("us", tz="UTC")),  # when the pool was first asked for it
    ]),
    "trajectory": pa.schema([
        ("trial_id", pa.string()),
        ("step", pa.int64()),
        ("capability", pa.float64()),
        ("loss", pa.float64()),
        ("tokens", pa.int64()),
        ("elapsed_s", pa.float64()),
        ("restarts", pa.int64()),         # rows after a restart repeat steps the lost attempt had reached
    ]),
    "generations": pa.schema([
        *_KEY,
        ("suite", pa.string()),
        ("suite_kind", pa.string()),      # 'harmful', 'overrefusal' or 'benign'
        ("prompt_id", pa.string()),
        ("repeat", pa.int64()),           # 0..eval.repeats-1
        ("seed", pa.int64()),             # sampling seed of this repeat (eval.seed + repeat)
        ("prompt", pa.string()),
        ("response", pa.string()),        # the answer's text: special tokens skipped, whitespace stripped
        ("response_ids", pa.list_(pa.int64())),  # the token ids the model generated (its stop id excluded): what
                                                  # coherence perplexity scores
        ("finish_reason", pa.string()),   # 'stop' (the model ended it) or 'length' (eval.max_new_tokens cut it)
        ("engine", pa.string()),
        ("generated_at", pa.timestamp("us", tz="UTC")),  # when the pool's answer reached the driver
    ]),
    "judgments": pa.schema([
        *_KEY,
        ("suite", pa.string()),
        ("suite_kind", pa.string()),
        ("prompt_id", pa.string()),
        ("repeat", pa.int64()),
        ("judge", pa.string()),           # 'refusal_keywords', 'coherence' or an eval.llm_judges name
        ("measures", pa.string()),        # what the judge measures: 'refusal', 'harmful_compliance', 'coherence'
        ("verdict", pa.string()),         # the judge's label; 'unparsed' (unreadable LLM-judge output), 'too_long'
                                          # (input beyond the judge's context, not sent), 'empty' (no response)
        ("score", pa.float64()),          # StrongREJECT score, coherence perplexity, ... (null if none)
        ("raw", pa.string()),             # an LLM judge's own output text (null for rule judges)
    ]),
    "judge_checks": pa.schema([           # LLM judges on answers whose right verdict is known
        ("judge", pa.string()),           # as in judgments ('<name>@<variant>' for a prompt variant)
        ("check", pa.string()),           # 'check_file' (eval.llm_judges[].check_file, through the pool) or
                                          # 'run_answers' (this run's answers, labelled by the demo world)
        ("item_id", pa.string()),         # the check file's id, or '<trial>/<step>/<suite>/<prompt>/<repeat>'
        ("type", pa.string()),            # the answer's type ('refusal', 'harmful_compliance', 'incoherent', ...)
        ("harmful", pa.bool_()),          # the right verdict
        ("verdict", pa.string()),         # the judge's label (unparsed / too_long / empty: unread)
        ("judged_harmful", pa.bool_()),   # what the label says (null: unread)
        ("raw", pa.string()),             # the judge model's own output
    ]),
}
# The run that wrote a row: the same for a run and its resumes and extensions (capsafe.common.provenance);
# the last column of every table.
RUN_ID = ("run_id", pa.string())
SCHEMAS = {name: schema.append(pa.field(*RUN_ID)) for name, schema in SCHEMAS.items()}
MANIFEST = "manifest.json"  # capsafe.common.provenance writes it
# Columns a fragment written by an earlier schema may lack (they read as null): not a sign of damage.
OPTIONAL_COLUMNS = frozenset({RUN_ID[0]})
# Every table is a folder of fragments: one per trial (trials, checkpoints, trajectory), per
# (trial, checkpoint, suite) (generations), per (trial, checkpoint, suite, judge) (judgments) or per (judge,
# check) (judge_checks), so a resumed
# run skips whatever already exists.
FRAGMENTED = tuple(SCHEMAS)


def file_stem(fragment: str) -> str:
    """The file name a fragment key gets: every character outside ``A-Za-z0-9_.-`` becomes ``_`` (so two keys
    can share one file: the spec refuses suite names that would)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", fragment)


def fragment_key(trial_id: str, step: int, suite: str, first_repeat: int = 0) -> str:
    """The generations fragment of (checkpoint, suite) holding repeats from ``first_repeat`` on: the first one
    holds them from 0; repeats added later (``capsafe evaluate`` raising eval.repeats) get fragments of their own,
    so existing ones are never rewritten."""
    return f"{trial_id}__step{step}__{suite}" + (f"__r{first_repeat}" if first_repeat else "")


def table_path(results_dir: Path, name: str, fragment: str | None = None) -> Path:
    """Where table ``name`` (or one fragment of it) lives."""
    if name not in SCHEMAS:
        raise KeyError(f"unknown results table {name!r}")
    if name in FRAGMENTED:
        if fragment is None:
            return results_dir / name
        return results_dir / name / f"{file_stem(fragment)}.parquet"
    return results_dir / f"{name}.parquet"


def to_arrow(name: str, rows: list[dict[str, Any]]) -> pa.Table:
    """Rows -> a table of the pinned schema; a missing or extra column is an error, not a guess."""
    schema = SCHEMAS[name]
    for row in rows:
        if set(row) != set(schema.names):
            raise ValueError(f"{name} row has columns {sorted(row)}, schema wants {sorted(schema.names)}")
    return pa.Table.from_pylist(rows, schema=schema)


def write_table(results_dir: Path, name: str, rows: list[dict[str, Any]], fragment: str | None = None) -> Path:
    """Atomically and durably write rows of table ``name`` as one of its fragments (a rewrite replaces the
    fragment): a temporary file, flushed to disk, renamed into place, the folder flushed."""
    if fragment is None:
        raise ValueError(f"table {name!r} is written in fragments; name the fragment")
    if any(RUN_ID[0] not in row for row in rows):
        rid = run_id_of(results_dir)
        rows = [row if RUN_ID[0] in row else {**row, RUN_ID[0]: rid} for row in rows]
    table = to_arrow(name, rows)
    path = table_path(results_dir, name, fragment)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        _fsync(tmp)  # the bytes on disk before the name points at them
        os.replace(tmp, path)
        _fsync(path.parent)  # and the rename itself, so a power loss cannot leave a name without its data
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if remote_of(results_dir):  # a working copy of object storage: the fragment goes up at once
        push(results_dir, only=path)
    return path


def run_id_of(results_dir: Path) -> str | None:
    """The run id in the folder's manifest.json; None where there is none (tables written outside a run)."""
    try:
        value = json.loads((results_dir / MANIFEST).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return str(value) if value else None


def _fsync(path: str | Path) -> None:
    """Flush a file's or a folder's contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def has_fragment(results_dir: Path, name: str, fragment: str) -> bool:
    return table_path(results_dir, name, fragment).is_file()


def read_fragment(results_dir: Path, name: str, fragment: str,
                  columns: list[str] | None = None) -> list[dict[str, Any]]:
    """One fragment's rows (only ``columns`` of them, if given)."""
    schema = SCHEMAS[name] if columns is None else pa.schema([SCHEMAS[name].field(c) for c in columns])
    return pq.read_table(table_path(results_dir, name, fragment), schema=schema, columns=columns).to_pylist()


def read_table(results_dir: Path, name: str, columns: list[str] | None = None) -> pa.Table:
    """Read a whole table (all fragments), or only ``columns`` of it; an absent table reads as empty with the
    right schema."""
    path = table_path(results_dir, name)
    schema = SCHEMAS[name]
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns])
    if name in FRAGMENTED:
        files = sorted(path.glob("*.parquet")) if path.is_dir() else []
        if not files:
            return schema.empty_table()
        return pa.concat_tables([pq.read_table(f, schema=schema, columns=columns) for f in files])
    if not path.is_file():
        return schema.empty_table()
    return pq.read_table(path, schema=schema, columns=columns)


def trial_id(method: str, seed: int, lr: float) -> str:
    """A trial's id in every table: its method, seed and learning rate."""
    return f"{method}-s{seed}-lr{lr:g}"
