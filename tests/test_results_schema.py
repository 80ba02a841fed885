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
    assert SCHEMA_VERSION == 11
    got = {name: " ".join(f"{f.name}:{f.type}" for f in schema) for name, schema in SCHEMAS.items()}
    assert got == {name: f"{columns} run_id:string" for name, columns in PINNED.items()}  # every table: its run


def test_writes_are_atomic_and_validated(tmp_path: Path) -> None:
    row = {"trial_id": "t", "step": 1, "capability": 0.5, "loss": 1.0, "tokens": 10, "elapsed_s": 2.0,
           "restarts": 0}
    write_table(tmp_path, "trajectory", [row], fragment="t")
    assert read_table(tmp_path, "trajectory").to_pylist() == [{**row, "run_id": None}]  # no manifest: no run
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


def test_every_row_carries_its_run_id_and_old_fragments_read_as_null(tmp_path: Path) -> None:
    # issue 26 §5: two runs' tables stack without their trial ids colliding
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    row = {"trial_id": "plain-s0-lr0.001", "step": 1, "capability": 0.5, "loss": 1.0, "tokens": 10,
           "elapsed_s": 2.0, "restarts": 0}
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "manifest.json").write_text(json.dumps({"run_id": f"id-{run}"}))
        write_table(tmp_path / run, "trajectory", [row], fragment=row["trial_id"])
    both = pa.concat_tables([read_table(tmp_path / run, "trajectory") for run in ("a", "b")]).to_pandas()
    assert sorted(both["run_id"]) == ["id-a", "id-b"] and not both.duplicated(["run_id", "trial_id", "step"]).any()
    # a row that names its run keeps it (a trial row read back and rewritten)
    write_table(tmp_path / "a", "trajectory", [{**row, "run_id": "id-other"}], fragment="x")
    assert set(read_table(tmp_path / "a", "trajectory").column("run_id").to_pylist()) == {"id-a", "id-other"}
    # a fragment of schema 10 (no run_id column) reads with a null run id, and is not taken for a damaged one
    # (whose columns are not the table's: those are moved aside by --resume and refused by the report)
    from capsafe.common.run_guard import damaged_fragments

    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "b" / "trajectory" / "old.parquet")
    ids = read_table(tmp_path / "b", "trajectory").column("run_id").to_pylist()
    assert len(ids) == 2 and set(ids) == {"id-b", None}
    assert damaged_fragments(tmp_path / "b") == []
    pq.write_table(pa.Table.from_pylist([{"trial_id": "t", "step": 1}]), tmp_path / "b" / "trajectory" / "cut.parquet")
    assert [p.name for p, _ in damaged_fragments(tmp_path / "b")] == ["cut.parquet"]
