"""Capability-task records (prompt, answer) from jsonl / json / csv / parquet files or Hugging Face datasets."""

from __future__ import annotations

import csv
import json
import os
import string
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from capsafe.common.data import jsonl_lines
from capsafe.errors import DataError

HF_PREFIX = "hf:"
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def parse_hf_source(source: str) -> tuple[str, str | None] | None:
    """``"hf:<id>[@<config>]"`` -> ``(id, config or None)``; None for a source that is not ``hf:``."""
    if not source.startswith(HF_PREFIX):
        return None
    ref = source[len(HF_PREFIX):].strip()
    name, sep, config = ref.rpartition("@")
    if not sep:
        name, config = ref, ""
    if not name:
        raise DataError(f"task source '{source}' names no dataset; write it as hf:<dataset id> or "
                        "hf:<dataset id>@<config>, e.g. hf:openai/gsm8k@main.")
    return name, config or None


def load_task_records(source: str, split: str | None, prompt_field: str = "prompt", answer_field: str = "answer",
                      choices_field: str | None = None, limit: int | None = None) -> list[dict[str, str]]:
    """``[{"prompt": ..., "answer": ...}, ...]`` in source order, mapped from the given fields.

    With ``choices_field`` the choices are appended to the prompt as "A. ...", "B. ..." lines and an index
    answer (0 -> "A") becomes its letter. ``split`` is required for ``hf:`` sources and ignored otherwise.
    """
    if limit is not None and limit < 0:
        raise DataError(f"task limit is {limit}; set it to a positive number of records or leave it unset.")
    hf = parse_hf_source(source)
    rows = _hf_rows(source, *hf, split) if hf is not None else _local_rows(source)
    records: list[dict[str, str]] = []
    if limit != 0:
        for where, row in rows:
            records.append(_to_record(where, row, prompt_field, answer_field, choices_field))
            # Stop before reading further rows, so a large or partly broken file costs only what is kept.
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise DataError(f"task source '{source}' has no records" + (f" in split '{split}'" if hf else "")
                        + "; point the task at a file or split with data.")
    return records


def write_jsonl(path: str | Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Write one JSON object per line, atomically: readers see the old file or the whole new one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _to_record(where: str, row: Mapping[str, Any], prompt_field: str, answer_field: str,
               choices_field: str | None) -> dict[str, str]:
    if not isinstance(row, Mapping):
        raise DataError(f"{where} is a {type(row).__name__}, not an object; each record must be a JSON object "
                        "with the prompt and answer fields.")
    wanted = [(prompt_field, "prompt_field"), (answer_field, "answer_field")]
    if choices_field is not None:
        wanted.append((choices_field, "choices_field"))
    missing = [(name, setting) for name, setting in wanted if name not in row]
    if missing:
        fields = ", ".join(repr(name) for name, _ in missing)
        settings = " / ".join(f"task.{setting}" for _, setting in missing)
        raise DataError(f"{where} has no field {fields}; its fields are {sorted(map(str, row))}. "
                        f"Set {settings} in the spec to the field that holds it.")
    prompt = _text(where, prompt_field, row[prompt_field])
    raw_answer = row[answer_field]
    if choices_field is None:
        return {"prompt": prompt, "answer": _text(where, answer_field, raw_answer)}
    choices = row[choices_field]
    if isinstance(choices, (str, bytes)) or not isinstance(choices, Iterable):
        raise DataError(f"{where}: field '{choices_field}' is {type(choices).__name__}, not a list of choices; "
                        "set task.choices_field to a list-valued field or unset it.")
    choices = [_text(where, choices_field, c) for c in choices]
    if not 0 < len(choices) <= len(string.ascii_uppercase):
        raise DataError(f"{where}: field '{choices_field}' has {len(choices)} choices; between 1 and 26 are "
                        "supported.")
    letters = string.ascii_uppercase[: len(choices)]
    lines = "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, choices, strict=True))
    return {"prompt": f"{prompt}\n{lines}", "answer": _choice_letter(where, answer_field, raw_answer, letters)}


def _choice_letter(where: str, field: str, answer: Any, letters: str) -> str:
    if isinstance(answer, bool):
        index = None
    elif isinstance(answer, int):
        index = answer
    elif isinstance(answer, str) and answer.strip().isdigit():
        index = int(answer.strip())
    elif isinstance(answer, str) and answer.strip().upper() in letters and len(answer.strip()) == 1:
        return answer.strip().upper()
    else:
        index = None
    if index is None or not 0 <= index < len(letters):
        raise DataError(f"{where}: answer {answer!r} in field '{field}' is neither a choice index (0 to "
                        f"{len(letters) - 1}) nor a letter ({letters[0]} to {letters[-1]}); fix the record or "
                        "set task.answer_field to the field that holds the choice.")
    return letters[index]


def _text(where: str, field: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: field '{field}' is {type(value).__name__} ({value!r:.60}), not text or a "
                    "number; point the task's field settings at a text field.")


def _local_rows(source: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise DataError(f"task source '{source}' has an unsupported extension '{suffix}'; use a "
                        f"{' / '.join(LOCAL_SUFFIXES)} file or hf:<dataset id>[@<config>].")
    if not path.is_file():
        raise DataError(f"task file '{source}' does not exist; fix the task source path in the spec.")
    if suffix == ".jsonl":
        yield from _jsonl_rows(path)
    elif suffix == ".json":
        yield from _json_rows(path)
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            # Row numbers count the header as row 1, matching what a spreadsheet shows.
            for n, row in enumerate(csv.DictReader(fh), 2):
                yield f"{source} row {n}", row
    else:
        yield from _parquet_rows(path)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for lineno, row in jsonl_lines(path):
        yield f"{path}:{lineno}", row


def _json_rows(path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); a .json task file must hold "
                        "a list of objects (use .jsonl for one object per line).") from None
    if not isinstance(data, list):
        raise DataError(f"{path} holds a JSON {type(data).__name__}, not a list of objects; wrap the records in "
                        "[...] or write them as .jsonl.")
    for n, row in enumerate(data):
        yield f"{path} item {n}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path} is not a readable parquet file ({exc}); re-export it as parquet.") from None
    for n, row in enumerate(table.to_pylist()):
        yield f"{path} row {n}", row


def _hf_rows(source: str, name: str, config: str | None, split: str | None) -> Iterator[tuple[str, Mapping[str, Any]]]:
    if split is None:
        raise DataError(f"task source '{source}' is a Hugging Face dataset but no split is set; set task.split "
                        "(e.g. train or test).")
    import datasets

    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except (OSError, ValueError) as exc:  # not found, offline / unreachable (ConnectionError), unknown config or split
        raise DataError(f"could not load Hugging Face dataset '{name}'"
                        + (f" config '{config}'" if config else "") + f" split '{split}' ({exc}); check the id, "
                        "config and split, and that the hub is reachable or the dataset is cached.") from None
    for n, row in enumerate(dataset):
        yield f"{source} split '{split}' row {n}", row
