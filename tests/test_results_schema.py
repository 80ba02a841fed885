"""Pins the results schema: changing it must be a deliberate edit here (and a SCHEMA_VERSION bump)."""

from pathlib import Path

import pytest

from capsafe.common.results import SCHEMA_VERSION, SCHEMAS, read_table, write_table

PINNED = {
    "trials": "trial_id:string method:string seed:int64 learning_rate:double target:double tolerance:double "
              "reached:bool capability:double confirmed_capability:double step:int64 status:string "
              "stop_reason:string checkpoint:string tokens:int64 "
              "wall_s:double train_s:double eval_s:double restarts:int64 method_params:string "
              "finished_at:timestamp[us, tz=UTC]",
    "checkpoints": "trial_id:string level:double reached:bool step:int64 capability:double tokens:int64 "
                   "elapsed_s:double checkpoint:string served_capability:double confirmed_capability:double "
                   "confirmed_items:int64 postprocess:string evaluation_started_at:timestamp[us, tz=UTC]",
    "trajectory": "trial_id:string step:int64 capability:double loss:double tokens:int64 elapsed_s:double "
                  "restarts:int64",
    "generations": "trial_id:string step:int64 suite:string suite_kind:string prompt_id:string repeat:int64 "
                   "seed:int64 prompt:string response:string response_ids:list<item: int64> finish_reason:string "
                   "engine:string "
                   "generated_at:timestamp[us, tz=UTC]",
    "judgments": "trial_id:string step:int64 suite:string suite_kind:string prompt_id:string repeat:int64 "
                 "judge:string measures:string verdict:string score:double raw:string",
    "judge_checks": "judge:string check:string item_id:string type:string harmful:bool verdict:string "
                    "judged_harmful:bool raw:string",
}


def test_schema_is_pinned() -> None:
    assert SCHEMA_VERSION == 10
    got = {name: " ".join(f"{f.name}:{f.type}" for f in schema) for name, schema in SCHEMAS.items()}
    assert got == PINNED


def test_writes_are_atomic_and_validated(tmp_path: Path) -> None:
    row = {"trial_id": "t", "step": 1, "capability": 0.5, "loss": 1.0, "tokens": 10, "elapsed_s": 2.0,
           "restarts": 0}
    write_table(tmp_path, "trajectory", [row], fragment="t")
    assert read_table(tmp_path, "trajectory").to_pylist() == [row]
    with pytest.raises(ValueError):
        write_table(tmp_path, "trajectory", [{**row, "extra": 1}], fragment="t")
    with pytest.raises(ValueError):
        write_table(tmp_path, "trajectory", [row])  # every table is written one fragment at a time
    assert read_table(tmp_path, "trajectory").num_rows == 1  # the failed write changed nothing
    assert not list(tmp_path.glob(".*tmp"))


def test_fragments_read_as_one_table(tmp_path: Path) -> None:
    base = {"step": 0, "suite": "s", "suite_kind": "harmful", "prompt_id": "1", "repeat": 0, "judge": "j",
            "measures": "refusal", "verdict": "refusal", "score": None, "raw": None}
    write_table(tmp_path, "judgments", [{**base, "trial_id": "a"}], fragment="a__s")
    write_table(tmp_path, "judgments", [{**base, "trial_id": "b"}], fragment="b__s")
    assert sorted(read_table(tmp_path, "judgments").column("trial_id").to_pylist()) == ["a", "b"]
    assert read_table(tmp_path / "none", "generations").num_rows == 0
