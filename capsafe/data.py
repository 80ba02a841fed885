"""Reading jsonl data and drawing training batches from a weighted mix of sources. Pure Python."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from capsafe.errors import DataError


def read_jsonl(path: str | Path, required: tuple[str, ...]) -> list[dict]:
    """Rows of a jsonl file; each must have the ``required`` string fields."""
    rows = []
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file '{path}' does not exist; fix the path in the spec.")
    with p.open() as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno} is not valid JSON ({exc.msg}); one object per line.") from None
            missing = [k for k in required if not isinstance(row.get(k), str)]
            if missing:
                raise DataError(f"{path}:{lineno} lacks string field(s) {missing}; each line needs "
                                f"{list(required)}.")
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

    Every rank draws the same global batch and keeps its own slice, so no coordination is needed.
    """
    rng = random.Random(seed)
    names = [s.name for s in sources]
    weights = [s.weight for s in sources]
    by_name = {s.name: s for s in sources}
    while True:
        batch = []
        for name in rng.choices(names, weights=weights, k=batch_size):
            prompt, response = rng.choice(by_name[name].pairs)
            batch.append((name, prompt, response))
        yield batch
