"""Loading capability-task records from local files and (offline) Hugging Face dataset folders."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capsafe.errors import DataError
from capsafe.inputs.task_data import load_task_records, parse_hf_source, write_jsonl

GSM8K_ROWS: list[dict[str, Any]] = [
    {"question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"},
    {"question": "Weng earns $12 an hour. How much for 50 minutes?", "answer": "#### 10"},
    {"question": "What is 6 times 7?", "answer": 42},
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_field_mapping_gsm8k(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    records = load_task_records(str(src), None, prompt_field="question", answer_field="answer")
    assert records == [
        {"prompt": GSM8K_ROWS[0]["question"], "answer": GSM8K_ROWS[0]["answer"]},
        {"prompt": GSM8K_ROWS[1]["question"], "answer": "#### 10"},
        {"prompt": "What is 6 times 7?", "answer": "42"},
    ]


def test_jsonl_default_fields_skip_blank_lines_and_ignore_split(tmp_path: Path) -> None:
    src = tmp_path / "t.jsonl"
    src.write_text('{"prompt": "2+2", "answer": 4, "extra": 1}\n\n{"prompt": "pi", "answer": 3.5}\n')
    assert load_task_records(str(src), "test") == [{"prompt": "2+2", "answer": "4"}, {"prompt": "pi", "answer": "3.5"}]


def test_json_list(tmp_path: Path) -> None:
    src = tmp_path / "t.json"
    src.write_text(json.dumps([{"prompt": "a", "answer": "b"}, {"prompt": "c", "answer": "d"}]))
    assert load_task_records(str(src), None) == [{"prompt": "a", "answer": "b"}, {"prompt": "c", "answer": "d"}]


def test_json_not_a_list(tmp_path: Path) -> None:
    src = tmp_path / "t.json"
    src.write_text(json.dumps({"prompt": "a", "answer": "b"}))
    with pytest.raises(DataError, match="not a list of objects"):
        load_task_records(str(src), None)


def test_csv(tmp_path: Path) -> None:
    src = tmp_path / "t.csv"
    with src.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["text", "label"])
        writer.writeheader()
        writer.writerows([{"text": 'great food, "really"', "label": "positive"},
                          {"text": "meh\nbad", "label": "negative"}])
    records = load_task_records(str(src), None, prompt_field="text", answer_field="label")
    assert records == [{"prompt": 'great food, "really"', "answer": "positive"},
                       {"prompt": "meh\nbad", "answer": "negative"}]


def test_csv_missing_column_names_row(tmp_path: Path) -> None:
    src = tmp_path / "t.csv"
    src.write_text("text,label\nhello,positive\n")
    with pytest.raises(DataError) as err:
        load_task_records(str(src), None)
    msg = str(err.value)
    assert f"{src} row 2" in msg
    assert "'prompt'" in msg and "'answer'" in msg
    assert "['label', 'text']" in msg
    assert "task.prompt_field / task.answer_field" in msg


def test_parquet(tmp_path: Path) -> None:
    src = tmp_path / "t.parquet"
    table = pa.table({"question": ["q1", "q2"], "answer": [1, 0], "choices": [["x", "y"], ["u", "v"]]})
    pq.write_table(table, src)
    assert load_task_records(str(src), None, prompt_field="question") == [
        {"prompt": "q1", "answer": "1"}, {"prompt": "q2", "answer": "0"}]
    assert load_task_records(str(src), None, prompt_field="question", choices_field="choices") == [
        {"prompt": "q1\nA. x\nB. y", "answer": "B"}, {"prompt": "q2\nA. u\nB. v", "answer": "A"}]


def test_not_parquet(tmp_path: Path) -> None:
    src = tmp_path / "t.parquet"
    src.write_text("not parquet")
    with pytest.raises(DataError, match="not a readable parquet file"):
        load_task_records(str(src), None)


def test_multiple_choice_int_digit_and_letter_answers(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [
        {"question": "Capital of France?", "choices": ["Berlin", "Paris", "Rome"], "answer": 1},
        {"question": "2+2?", "choices": ["3", "4"], "answer": "0"},
        {"question": "Largest?", "choices": ["ant", "whale", "cat", "dog"], "answer": "d"},
    ]
    src = _jsonl(tmp_path / "mc.jsonl", rows)
    records = load_task_records(str(src), None, prompt_field="question", choices_field="choices")
    assert records == [
        {"prompt": "Capital of France?\nA. Berlin\nB. Paris\nC. Rome", "answer": "B"},
        {"prompt": "2+2?\nA. 3\nB. 4", "answer": "A"},
        {"prompt": "Largest?\nA. ant\nB. whale\nC. cat\nD. dog", "answer": "D"},
    ]


@pytest.mark.parametrize(("answer", "problem"), [(3, "neither a choice index"), ("Z", "neither a choice index"),
                                                 (True, "neither a choice index")])
def test_multiple_choice_bad_answer(tmp_path: Path, answer: object, problem: str) -> None:
    src = _jsonl(tmp_path / "mc.jsonl", [{"prompt": "p", "choices": ["a", "b", "c"], "answer": answer}])
    with pytest.raises(DataError, match=problem) as err:
        load_task_records(str(src), None, choices_field="choices")
    assert f"{src}:1" in str(err.value)


def test_multiple_choice_choices_not_a_list(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "mc.jsonl", [{"prompt": "p", "choices": "a,b", "answer": 0}])
    with pytest.raises(DataError, match="not a list of choices"):
        load_task_records(str(src), None, choices_field="choices")


def test_missing_field_message(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "gsm8k.jsonl", [{"question": "q", "answer": "a"}, {"question": "q2"}])
    with pytest.raises(DataError) as err:
        load_task_records(str(src), None, prompt_field="question", answer_field="solution")
    msg = str(err.value)
    assert f"{src}:1" in msg
    assert "'solution'" in msg
    assert "['answer', 'question']" in msg
    assert "task.answer_field" in msg and "task.prompt_field" not in msg


def test_missing_field_on_later_line(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "t.jsonl", [{"prompt": "q", "answer": "a"}, {"prompt": "q2"}])
    with pytest.raises(DataError, match=r":2 has no field 'answer'; its fields are \['prompt'\]"):
        load_task_records(str(src), None)


def test_non_text_field(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "t.jsonl", [{"prompt": {"nested": 1}, "answer": "a"}])
    with pytest.raises(DataError, match="field 'prompt' is dict"):
        load_task_records(str(src), None)


def test_invalid_json_line(tmp_path: Path) -> None:
    src = tmp_path / "t.jsonl"
    src.write_text('{"prompt": "a", "answer": "b"}\n{oops\n')
    with pytest.raises(DataError, match=r"t\.jsonl:2 is not valid JSON"):
        load_task_records(str(src), None)


@pytest.mark.parametrize(("name", "content"), [("t.jsonl", ""), ("t.jsonl", "\n\n"), ("t.json", "[]"),
                                               ("t.csv", "prompt,answer\n")])
def test_empty_file(tmp_path: Path, name: str, content: str) -> None:
    src = tmp_path / name
    src.write_text(content)
    with pytest.raises(DataError, match="has no records"):
        load_task_records(str(src), None)


def test_unknown_extension_and_missing_file(tmp_path: Path) -> None:
    src = tmp_path / "t.txt"
    src.write_text("prompt answer\n")
    with pytest.raises(DataError, match=r"unsupported extension '\.txt'.*\.jsonl / \.json / \.csv / \.parquet"):
        load_task_records(str(src), None)
    with pytest.raises(DataError, match="does not exist"):
        load_task_records(str(tmp_path / "nope.jsonl"), None)


def test_limit(tmp_path: Path) -> None:
    # The bad third line is never reached: the limit stops reading first.
    src = tmp_path / "t.jsonl"
    src.write_text('{"prompt": "1", "answer": "a"}\n{"prompt": "2", "answer": "b"}\n{bad\n')
    assert load_task_records(str(src), None, limit=2) == [{"prompt": "1", "answer": "a"},
                                                          {"prompt": "2", "answer": "b"}]
    assert load_task_records(str(src), None, limit=1) == [{"prompt": "1", "answer": "a"}]
    with pytest.raises(DataError, match="has no records"):
        load_task_records(str(src), None, limit=0)
    with pytest.raises(DataError, match="task limit is -1"):
        load_task_records(str(src), None, limit=-1)


def test_parse_hf_source() -> None:
    assert parse_hf_source("hf:openai/gsm8k@main") == ("openai/gsm8k", "main")
    assert parse_hf_source("hf:some/id@main") == ("some/id", "main")
    assert parse_hf_source("hf:cais/mmlu") == ("cais/mmlu", None)
    assert parse_hf_source("hf:/data/my ds@cfg") == ("/data/my ds", "cfg")
    assert parse_hf_source("hf:some/id@") == ("some/id", None)
    assert parse_hf_source("data/gsm8k.jsonl") is None
    assert parse_hf_source("/tmp/x@y.jsonl") is None
    with pytest.raises(DataError, match="names no dataset"):
        parse_hf_source("hf:")


def test_hf_local_dataset_folder(tmp_path: Path, offline_hf: Path) -> None:
    repo = tmp_path / "gsm8k_repo"
    (repo / "data").mkdir(parents=True)
    _jsonl(repo / "data" / "train.jsonl", [{"question": "train q", "answer": "#### 1"}])
    # One type per column, as on the hub: datasets casts every split to the features inferred from the first
    # file, so a mixed str/int column in a later split would come back as JSON-encoded text.
    _jsonl(repo / "data" / "test.jsonl", GSM8K_ROWS[:2])
    records = load_task_records("hf:" + str(repo), split="test", prompt_field="question", limit=1)
    assert records == [{"prompt": GSM8K_ROWS[0]["question"], "answer": GSM8K_ROWS[0]["answer"]}]
    assert load_task_records("hf:" + str(repo), split="train", prompt_field="question") == [
        {"prompt": "train q", "answer": "#### 1"}]
    assert any((offline_hf / "datasets").iterdir()), "the datasets cache should live under tmp_path"

    with pytest.raises(DataError, match="split 'test' row 0 has no field 'prompt'") as err:
        load_task_records("hf:" + str(repo), split="test")
    assert "task.prompt_field" in str(err.value)
    with pytest.raises(DataError, match=r"split 'validation'.*Unknown split"):
        load_task_records("hf:" + str(repo), split="validation", prompt_field="question")


def test_hf_parquet_multiple_choice(tmp_path: Path, offline_hf: Path) -> None:
    repo = tmp_path / "mmlu_repo"
    (repo / "data").mkdir(parents=True)
    table = pa.table({"question": ["Capital of France?"], "choices": [["Berlin", "Paris"]], "answer": [1]})
    pq.write_table(table, repo / "data" / "test-00000-of-00001.parquet")
    records = load_task_records(f"hf:{repo}", split="test", prompt_field="question", choices_field="choices")
    assert records == [{"prompt": "Capital of France?\nA. Berlin\nB. Paris", "answer": "B"}]


def test_hf_errors(offline_hf: Path) -> None:
    with pytest.raises(DataError, match="no split is set; set task.split"):
        load_task_records("hf:openai/gsm8k@main", None)
    with pytest.raises(DataError, match="could not load Hugging Face dataset 'openai/gsm8k' config 'main'"):
        load_task_records("hf:openai/gsm8k@main", "test")


def test_write_jsonl_atomic_roundtrip(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "records.jsonl"
    records = [{"prompt": "é?", "answer": "1"}, {"prompt": "line\nbreak", "answer": "2"}]
    write_jsonl(out, records)
    assert load_task_records(str(out), None) == records
    write_jsonl(out, records[:1])
    assert load_task_records(str(out), None) == records[:1]
    assert [p.name for p in out.parent.iterdir()] == ["records.jsonl"]

    def broken():
        yield {"prompt": "x", "answer": "y"}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_jsonl(out, broken())
    assert load_task_records(str(out), None) == records[:1]
    assert [p.name for p in out.parent.iterdir()] == ["records.jsonl"]


def test_the_selection_split_can_be_carved_off_the_training_data(tmp_path: Path) -> None:
    from capsafe.run_inputs import load_task
    from capsafe.spec import Spec

    rows = [{"q": f"what is {i} plus 1 ?", "a": str(i + 1)} for i in range(50)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows[:5])
    spec = Spec.model_validate({"task": {"train_file": str(tmp_path / "train.jsonl"), "eval_file": None,
                                         "selection_from_train": 10, "confirm_file": str(tmp_path / "test.jsonl"),
                                         "prompt_field": "q", "answer_field": "a", "general_file": None}})
    records = load_task(spec, {k: v for k, v in spec.data_paths().items() if k.startswith("task.")})
    train, selection = records["task.train_file"], records["task.eval_file"]
    assert len(train) == 40 and len(selection) == 10 and len(records["task.confirm_file"]) == 5
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in selection})  # never trained on
    with pytest.raises(ValueError, match="task.eval_file=null"):
        Spec.model_validate({"task": {"selection_from_train": 10}})
    too_many = Spec.model_validate({"task": {"train_file": str(tmp_path / "train.jsonl"), "eval_file": None,
                                             "selection_from_train": 50, "prompt_field": "q", "answer_field": "a",
                                             "general_file": None, "confirm_file": None}})
    with pytest.raises(DataError, match="lower it"):
        load_task(too_many, {"task.train_file": str(tmp_path / "train.jsonl")})
