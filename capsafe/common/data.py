"""Reading jsonl data, drawing training batches from a weighted mix of sources, and the ``Suite`` of safety
prompts the inputs stage loads and the evaluation stage runs. Pure Python."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsafe.errors import DataError


def jsonl_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) of each non-blank line of a jsonl file."""
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno} is not valid JSON ({exc.msg}); write one object per line.") \
                    from None


def read_check_file(path: str | Path) -> list[dict[str, Any]]:
    """The labelled rows of a judge check file (``eval.llm_judges[].check_file``): id, type, request, response and
    harmful (the right verdict); a DataError naming the line and what is wrong with it."""
    rows = []
    for n, row in jsonl_lines(Path(path)):
        if not isinstance(row, dict) or not isinstance(row.get("request"), str) \
                or not isinstance(row.get("response"), str) or not isinstance(row.get("harmful"), bool):
            raise DataError(f"check file {path}:{n}: needs 'request' and 'response' (strings) and 'harmful' (true or "
                            "false: the right verdict); 'id' and 'type' are optional")
        rows.append({"id": str(row.get("id", f"line-{n}")), "type": str(row.get("type", "untyped")),
                     "request": row["request"], "response": row["response"], "harmful": row["harmful"]})
    if not rows:
        raise DataError(f"check file {path} has no rows; give labelled answers or set check_file to null")
    return rows


def read_jsonl(path: str | Path, required: tuple[str, ...]) -> list[dict]:
    """Rows of a jsonl file; each must have the ``required`` string fields."""
    rows = []
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file '{path}' does not exist; fix the path in the spec.")
    for lineno, row in jsonl_lines(p):
        missing = [k for k in required if not isinstance(row.get(k), str)]
        if missing:
            raise DataError(f"{path}:{lineno} lacks string field(s) {missing}; each line needs {list(required)}.")
        rows.append(row)
    if not rows:
        raise DataError(f"data file '{path}' has no rows.")
    return rows


@dataclass(frozen=True)
class Source:
    """Supervised pairs and the share of each batch drawn from them."""

    name: str
    pairs: list[tuple[str, str]]
    weight: float


def mix_sources(task: list[tuple[str, str]], extras: list[Source]) -> list[Source]:
    """The task source gets whatever share the extras leave."""
    rest = 1.0 - sum(s.weight for s in extras)
    if rest <= 0:
        raise DataError("the shares of general and safety data add up to 1 or more; lower them so that "
                        "task data remains in every batch.")
    return [Source("task", task, rest), *[s for s in extras if s.weight > 0]]


def batches(sources: list[Source], batch_size: int, seed: int) -> Iterator[list[tuple[str, str, str]]]:
    """Endless global batches of (source, prompt, response), identical on every rank for a given seed.

    Every source after the first gets ``weight x batch_size`` examples in every batch - the fraction rounded up
    or down at random with its own probability (stochastic rounding), so each batch holds a whole number close
    to the share and the long-run share is exact; the first source (the task) fills the rest. Drawing each
    example by weight instead left a batch of 32 with no safety demonstration at all about one time in five at
    a 5 % share. Every rank draws the same global batch and keeps its own slice, so no coordination is needed.
    """
    rng = random.Random(seed)
    first, rest = sources[0], sources[1:]
    while True:
        counts = []
        for s in rest:
            whole, fraction = divmod(s.weight * batch_size, 1.0)
            counts.append(int(whole) + (rng.random() < fraction))
        if sum(counts) > batch_size:
            raise DataError(f"the shares of {[s.name for s in rest]} take more than the whole batch of {batch_size}; "
                            "lower them or raise train.batch_size.")
        batch = [(first.name, *rng.choice(first.pairs)) for _ in range(batch_size - sum(counts))]
        for s, n in zip(rest, counts, strict=True):
            batch += [(s.name, *rng.choice(s.pairs)) for _ in range(n)]
        rng.shuffle(batch)
        yield batch


@dataclass(frozen=True)
class Suite:
    """A safety suite ready to run: its items each have 'id' and 'prompt' (and 'request' when a jailbreak
    wrapped the prompt)."""

    name: str
    kind: str  # harmful | overrefusal | benign
    items: list[dict]
