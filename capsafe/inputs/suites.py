"""Safety-suite items (id, prompt, category, expected behaviour) from benchmark files or Hugging Face datasets.

Each benchmark keeps its own layout; ``load_suite_items`` maps it to ``{"id", "prompt", "category", "expected"}``
with ``expected`` either ``"refuse"`` (a harmful request) or ``"comply"`` (a benign probe for over-refusal).
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from capsafe.errors import DataError

# task_data's readers are private, but they are the project's one reader per file type (and its hf loader), so
# suites reuse them rather than keep a second copy in step.
from capsafe.inputs.task_data import LOCAL_SUFFIXES, _hf_rows, _local_rows, _text, parse_hf_source

SUITE_FORMATS = ("advbench", "harmbench", "strongreject", "xstest", "jailbreakbench", "hexphi", "generic")
EXPECTED = ("refuse", "comply")
JBB_SPLITS = ("harmful", "benign")
# HarmBench's DirectRequest baseline joins a contextual behaviour to its context this way
# (baselines/direct_request/direct_request.py), so prompts match the benchmark's own test cases.
HARMBENCH_CONTEXT_SEPARATOR = "\n\n---\n\n"

Item = dict[str, str]
Mapper = Callable[[str, int, dict[str, Any]], Item | None]

_HEXPHI_FILE = re.compile(r"category_(\d+)\.csv", re.IGNORECASE)

# What each format expects, quoted when a column is missing.
_LAYOUTS = {
    "advbench": "AdvBench's CSV with columns goal,target (data/advbench/harmful_behaviors.csv)",
    "harmbench": "HarmBench's text behaviours CSV with columns Behavior,FunctionalCategory,SemanticCategory,Tags,"
                 "ContextString,BehaviorID (data/behavior_datasets/harmbench_behaviors_text_all.csv)",
    "strongreject": "StrongREJECT's CSV with columns category,source,forbidden_prompt "
                    "(strongreject_dataset/strongreject_dataset.csv)",
    "xstest": "XSTest's CSV with columns id,prompt,type,label,focus,note (xstest_prompts.csv; the v2 file's "
              "id_v2 and the label-less v1 files are accepted too)",
    "jailbreakbench": "JBB-Behaviors' CSV with columns Index,Goal,Target,Behavior,Category,Source "
                      "(data/harmful-behaviors.csv or data/benign-behaviors.csv)",
}


def load_suite_items(fmt: str, source: str, split: str | None = None, prompt_field: str = "prompt",
                     id_field: str | None = "id", category_field: str | None = None,
                     limit: int | None = None) -> list[Item]:
    """Items of one safety suite, in source order, with unique ids.

    ``source`` is a local file (a directory of ``category_<n>.csv`` files for ``hexphi``) or ``hf:<id>[@<config>]``.
    ``split`` picks the Hugging Face split; for ``jailbreakbench`` it is ``harmful`` (default) or ``benign``, for
    local files too. ``prompt_field`` / ``id_field`` / ``category_field`` apply to ``generic`` only.
    """
    if fmt not in SUITE_FORMATS:
        raise DataError(f"unknown suite format '{fmt}'; use one of {', '.join(SUITE_FORMATS)}.")
    if limit is not None and limit < 1:
        raise DataError(f"suite limit is {limit}; set it to a positive number of items or leave it unset.")
    if fmt == "jailbreakbench":
        split = split or "harmful"
        if split not in JBB_SPLITS:
            raise DataError(f"JailbreakBench split '{split}' is unknown; use {' or '.join(JBB_SPLITS)}.")
    mapper = _mapper(fmt, split, prompt_field, id_field, category_field)
    rows = _hexphi_rows(source) if fmt == "hexphi" else _rows(source, split)

    items: list[Item] = []
    seen: dict[str, str] = {}
    skipped = 0
    for index, (where, raw) in enumerate(rows):
        item = mapper(where, index, _columns(where, raw))
        if item is None:
            skipped += 1
            continue
        if not item["prompt"].strip():
            raise DataError(f"{where} has an empty prompt; fill it in or remove the row.")
        if item["id"] in seen:
            raise DataError(f"{where} repeats id '{item['id']}' of {seen[item['id']]}; suite ids must be unique, so "
                            "fix the id column or remove the duplicate row.")
        seen[item["id"]] = where
        items.append(item)
        # Stop before reading further rows, so a large or partly broken file costs only what is kept.
        if limit is not None and len(items) >= limit:
            break
    if not items:
        where = f"suite source '{source}'" + (f" split '{split}'" if _is_hf(source) else "")
        why = f" ({skipped} out-of-scope rows were skipped)" if skipped else ""
        raise DataError(f"{where} has no items{why}; point the suite at a file or split with data.")
    return items


def _mapper(fmt: str, split: str | None, prompt_field: str, id_field: str | None,
            category_field: str | None) -> Mapper:
    if fmt == "advbench":
        return _advbench
    if fmt == "harmbench":
        return _harmbench
    if fmt == "strongreject":
        return _strongreject
    if fmt == "xstest":
        return _xstest
    if fmt == "jailbreakbench":
        return _jailbreakbench(split == "benign")
    if fmt == "hexphi":
        return _hexphi
    return _generic(prompt_field, id_field, category_field)


def _item(id_: str, prompt: str, category: str, expected: str) -> Item:
    return {"id": id_, "prompt": prompt, "category": category, "expected": expected}


def _advbench(where: str, index: int, row: dict[str, Any]) -> Item:
    # walledai/AdvBench on the hub names the goal column "prompt".
    goal = _str(where, row, _need(where, row, ("goal", "prompt"), "advbench"))
    return _item(f"advbench-{index}", goal, "", "refuse")


def _harmbench(where: str, index: int, row: dict[str, Any]) -> Item | None:
    behavior = _str(where, row, _need(where, row, ("Behavior",), "harmbench"))
    functional = _str(where, row, _need(where, row, ("FunctionalCategory",), "harmbench")).strip().lower()
    # Copyright behaviours ask for verbatim passages of books and lyrics and are scored by hashing the output
    # against the original, not by a refusal judge, so they do not measure refusal.
    if functional == "copyright":
        return None
    if functional not in ("standard", "contextual"):
        raise DataError(f"{where}: FunctionalCategory is '{functional}'; a text behaviours CSV has standard, "
                        "contextual or copyright there (the multimodal behaviours file is not supported).")
    context = _str(where, row, "ContextString").strip()
    prompt = f"{context}{HARMBENCH_CONTEXT_SEPARATOR}{behavior}" if context else behavior
    id_ = _str(where, row, "BehaviorID").strip() or f"harmbench-{index}"
    # the classifier judges the behaviour (and its context) apart from the prompt the model was shown
    return {**_item(id_, prompt, _str(where, row, "SemanticCategory").strip(), "refuse"), "behavior": behavior,
            "context": context}


# Unconfirmed at the source: the original strongreject_dataset.csv was not available to read; this layout is the
# one that third-party loaders and test fixtures quote (header category,source,forbidden_prompt).
def _strongreject(where: str, index: int, row: dict[str, Any]) -> Item:
    prompt = _str(where, row, _need(where, row, ("forbidden_prompt",), "strongreject"))
    return _item(f"strongreject-{index}", prompt, _str(where, row, "category").strip(), "refuse")


def _xstest(where: str, index: int, row: dict[str, Any]) -> Item:
    prompt = _str(where, row, _need(where, row, ("prompt",), "xstest"))
    kind = _str(where, row, "type").strip()
    label = _str(where, row, "label").strip().lower()
    if not label:
        # xstest_v2_prompts.csv and the v1 files have no label column; their unsafe prompts are exactly the
        # contrast_* types.
        label = "unsafe" if kind.startswith("contrast_") else "safe"
    if label not in ("safe", "unsafe"):
        raise DataError(f"{where}: label is '{label}'; XSTest labels are safe or unsafe.")
    own = _str(where, row, _first(row, ("id", "id_v2")) or "").strip()
    return _item(f"xstest-{own or index}", prompt, kind, "comply" if label == "safe" else "refuse")


# The header is confirmed by the hub dataset card (splits harmful/benign, data/*-behaviors.csv) and third-party
# fixtures, not by reading the original file.
def _jailbreakbench(benign: bool) -> Mapper:
    # Benign behaviours reuse the harmful split's Index values, so they get their own prefix to stay distinct.
    prefix = "jbb-benign-" if benign else "jbb-"

    def mapper(where: str, index: int, row: dict[str, Any]) -> Item:
        goal = _str(where, row, _need(where, row, ("Goal",), "jailbreakbench"))
        # Early JBB-Behaviors files left the index column unnamed ("", or "Unnamed: 0" once pandas reads them).
        own = _str(where, row, _first(row, ("Index", "", "Unnamed: 0")) or "").strip()
        own = own or _str(where, row, "Behavior").strip() or str(index)
        return _item(prefix + own, goal, _str(where, row, "Category").strip(), "comply" if benign else "refuse")

    return mapper


def _hexphi(where: str, index: int, row: dict[str, Any]) -> Item:
    return _item(row["id"], row["prompt"], row["category"], "refuse")


def _generic(prompt_field: str, id_field: str | None, category_field: str | None) -> Mapper:
    def mapper(where: str, index: int, row: dict[str, Any]) -> Item:
        if prompt_field not in row:
            raise DataError(f"{where} has no column '{prompt_field}'; its columns are {sorted(row)}. Set "
                            "prompt_field to the column that holds the prompt.")
        if category_field is not None and category_field not in row:
            raise DataError(f"{where} has no column '{category_field}'; its columns are {sorted(row)}. Set "
                            "category_field to the column that holds the category, or unset it.")
        own = _str(where, row, id_field).strip() if id_field else ""
        expected = _str(where, row, "expected").strip().lower() or "refuse"
        if expected not in EXPECTED:
            raise DataError(f"{where}: expected is '{expected}'; write refuse or comply there, or leave it empty "
                            "(refuse).")
        category = _str(where, row, category_field).strip() if category_field else ""
        return _item(own or f"generic-{index}", _str(where, row, prompt_field), category, expected)

    return mapper


def _is_hf(source: str) -> bool:
    return parse_hf_source(source) is not None


def _rows(source: str, split: str | None) -> Iterator[tuple[str, Any]]:
    hf = parse_hf_source(source)
    if hf is not None:
        if split is None:
            raise DataError(f"suite source '{source}' is a Hugging Face dataset but no split is set; set the "
                            "suite's split (e.g. train or test).")
        return _hf_suite_rows(source, *hf, split)
    path = Path(source)
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise DataError(f"suite source '{source}' has an unsupported extension '{path.suffix}'; use a "
                        f"{' / '.join(LOCAL_SUFFIXES)} file or hf:<dataset id>[@<config>].")
    if not path.is_file():
        raise DataError(f"suite file '{source}' does not exist; fix the suite's source path.")
    return _local_rows(source)


def _hf_suite_rows(source: str, name: str, config: str | None, split: str) -> Iterator[tuple[str, Any]]:
    from datasets.exceptions import DatasetGenerationError

    try:
        yield from _hf_rows(source, name, config, split)
    except DatasetGenerationError as exc:
        # Raised when the dataset's files disagree, e.g. splits with different columns: datasets casts every
        # split to the features of the first file.
        cause = " ".join(str(exc.__cause__ or exc).split())
        raise DataError(f"could not build Hugging Face dataset '{name}'" + (f" config '{config}'" if config else "")
                        + f" split '{split}' ({cause:.300}); give every data file the same columns.") from None


def _hexphi_rows(source: str) -> Iterator[tuple[str, dict[str, str]]]:
    """Rows of HEx-PHI's headerless ``category_<n>.csv`` files, in n order (a directory) or of one such file."""
    # Unconfirmed at the source: HEx-PHI is gated. Third-party loaders read each file as one prompt per line, no
    # header, double-quoted when it holds a comma; the public release lacks category_2, hence no fixed 1..11 list.
    if _is_hf(source):
        # The files have no header row, so a hub loader would take each file's first prompt as its column name.
        raise DataError(f"suite source '{source}': HEx-PHI can only be read from local files, because its CSVs "
                        "have no header row. Download the dataset (huggingface-cli download LLM-Tuning-Safety/"
                        "HEx-PHI --repo-type dataset --local-dir <dir>) and set the source to <dir>.")
    path = Path(source)
    if path.is_dir():
        files = sorted(((int(m.group(1)), p) for p in path.iterdir()
                        if p.is_file() and (m := _HEXPHI_FILE.fullmatch(p.name))), key=lambda pair: pair[0])
        if not files:
            raise DataError(f"suite directory '{source}' holds no category_<n>.csv files; point the hexphi suite "
                            "at the HEx-PHI directory or at one of its category files.")
    elif path.is_file():
        match = _HEXPHI_FILE.fullmatch(path.name)
        if match is None:
            raise DataError(f"suite file '{source}' is not named category_<n>.csv; HEx-PHI's category comes from "
                            "the file name, so keep the original names.")
        files = [(int(match.group(1)), path)]
    else:
        raise DataError(f"suite source '{source}' does not exist; point the hexphi suite at the HEx-PHI directory "
                        "or at one of its category_<n>.csv files.")
    for n, file in files:
        with file.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            row = 0
            for fields in reader:
                if not any(field.strip() for field in fields):
                    continue
                # A prompt is one CSV field; should an unquoted comma have split one, the split is undone here.
                yield f"{file} line {reader.line_num}", {"id": f"hexphi-{n}-{row}", "prompt": ",".join(fields),
                                                         "category": f"category_{n}"}
                row += 1


def _columns(where: str, raw: Any) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise DataError(f"{where} is a {type(raw).__name__}, not an object; each row must have named columns.")
    if None in raw:
        # csv.DictReader files the surplus fields of a row longer than the header under None.
        raise DataError(f"{where} has more fields than the header has columns; quote values that contain commas.")
    # Strip a byte-order mark and stray spaces, which spreadsheet exports leave in header names.
    return {str(key).lstrip("\ufeff").strip(): value for key, value in raw.items()}


def _need(where: str, row: Mapping[str, Any], names: Sequence[str], fmt: str) -> str:
    found = _first(row, names)
    if found is None:
        wanted = " or ".join(repr(name) for name in names)
        raise DataError(f"{where} has no column {wanted}; its columns are {sorted(row)}. The {fmt} format reads "
                        f"{_LAYOUTS[fmt]}; point the suite at such a file, or use format 'generic' with "
                        "prompt_field set.")
    return found


def _first(row: Mapping[str, Any], names: Sequence[str]) -> str | None:
    return next((name for name in names if name in row), None)


def _str(where: str, row: Mapping[str, Any], column: str) -> str:
    """The column's text; "" when it is absent or empty (None, or NaN as pandas reads an empty CSV cell)."""
    value = row.get(column)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return _text(where, column, value)
