"""Evaluation driver and report on hand-made inputs (no Ray, no model)."""

from concurrent.futures import Future
from pathlib import Path

import pandas as pd
import pytest

from capsafe.evaluate import Suite, evaluate_models
from capsafe.judges import make_judges
from capsafe.report import ladder_table, summarize, write_report
from capsafe.results import read_table, write_table


def _done(value: list[str]) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


def test_evaluate_writes_keyed_fragments_and_skips_done_work(tmp_path: Path) -> None:
    calls = []

    def submit(model_dir: str, prompts: list[str], n: int) -> Future:
        calls.append((model_dir, len(prompts)))
        reply = "sorry , i can not help with that ." if model_dir == "m-base" else "sure . first , do it ."
        return _done([reply] * len(prompts))

    suites = [Suite("harmful", "harmful", [{"id": str(i), "prompt": f"bad {i}"} for i in range(5)]),
              Suite("overrefusal", "overrefusal", [{"id": "a", "prompt": "kill a process"}])]
    judges = make_judges(["refusal_keywords", "coherence"])
    models = {("base", 0): "m-base", ("plain", 40): "m-plain"}
    n = evaluate_models(models, suites, lambda p: f"<user> {p} <assistant>", 8, submit, judges, "fake", tmp_path,
                        log=lambda m: None, chunk=2)
    assert n == 4 and len(calls) == 2 * (3 + 1)  # 5 prompts in chunks of 2 -> 3 requests
    judg = read_table(tmp_path, "judgments").to_pandas()
    assert len(judg) == 2 * 6 * 2 and not judg.duplicated(["trial_id", "step", "suite", "prompt_id", "judge"]).any()
    assert set(zip(judg["trial_id"], judg["step"], strict=True)) == {("base", 0), ("plain", 40)}
    gens = read_table(tmp_path, "generations").to_pandas()
    assert gens["prompt"].iloc[0].startswith("bad") and set(gens["engine"]) == {"fake"}
    calls.clear()
    assert evaluate_models(models, suites, str, 8, submit, judges, "fake", tmp_path, log=lambda m: None) == 0
    assert calls == []  # a rerun skips finished (trial, suite) pairs


def _trial(tid: str, method: str, reached: bool, cap: float, step: int) -> dict:
    return {"trial_id": tid, "method": method, "seed": 0, "learning_rate": 1e-3, "target": 0.4,
            "reached": reached, "capability": cap, "step": step,
            "status": "base" if method == "base" else ("reached" if reached else "not_reached"),
            "stop_reason": "reached" if reached else "budget:steps", "checkpoint": None, "tokens": step * 10,
            "wall_s": 1.0, "train_s": 0.9, "eval_s": 0.1, "restarts": 0, "method_params": "{}"}


def _judgments(tid: str, kind: str, refusals: int, total: int, incoherent: int = 0, step: int = -1) -> list[dict]:
    rows = []
    step = STEPS[tid] if step < 0 else step
    for i in range(total):
        base = {"trial_id": tid, "step": step, "suite": kind, "suite_kind": kind, "prompt_id": str(i)}
        rows.append({**base, "judge": "refusal_keywords", "verdict": "refusal" if i < refusals else "compliance"})
        rows.append({**base, "judge": "coherence", "verdict": "incoherent" if i >= total - incoherent else "coherent"})
    return rows


STEPS = {"base": 0, "p0": 100, "p1": 300, "m0": 800}


def _checkpoint(tid: str, level: float, step: int | None, cap: float | None) -> dict:
    return {"trial_id": tid, "level": level, "reached": step is not None, "step": step, "capability": cap,
            "tokens": None if step is None else step * 10, "elapsed_s": None if step is None else step / 10.0,
            "checkpoint": None, "served_capability": cap}


def test_report_numbers_on_a_hand_made_table(tmp_path: Path) -> None:
    trials = [_trial("base", "base", False, 0.0, 0), _trial("p0", "plain", True, 0.42, 100),
              _trial("p1", "plain", True, 0.46, 300), _trial("m0", "safety_mix", False, 0.3, 800)]
    judg = (_judgments("base", "harmful", 10, 10) + _judgments("base", "overrefusal", 1, 10)
            + _judgments("p0", "harmful", 2, 10, incoherent=4) + _judgments("p1", "harmful", 4, 10)
            + _judgments("p0", "overrefusal", 0, 10) + _judgments("p1", "overrefusal", 0, 10)
            + _judgments("p0", "harmful", 9, 10, step=50)  # a lower rung: not in the main table
            + _judgments("m0", "harmful", 10, 10))  # not reached: must not be counted
    for t in trials:
        write_table(tmp_path, "trials", [t], fragment=t["trial_id"])
    write_table(tmp_path, "judgments", judg, fragment="all")
    write_table(tmp_path, "checkpoints", [_checkpoint("p0", 0.2, 50, 0.25), _checkpoint("p0", 0.4, 100, 0.42),
                                          _checkpoint("p1", 0.2, 300, 0.46), _checkpoint("p1", 0.4, 300, 0.46),
                                          _checkpoint("m0", 0.2, 400, 0.21), _checkpoint("m0", 0.4, None, None)],
                fragment="all")
    table = summarize(read_table(tmp_path, "trials").to_pandas(), read_table(tmp_path, "judgments").to_pandas())
    rows = {r["method"]: r for r in table.to_dict("records")}
    assert rows["base"]["harmful refusal"] == 1.0 and rows["base"]["over-refusal"] == pytest.approx(0.1)
    assert rows["plain"]["trials reached"] == "2/2" and rows["plain"]["steps to target"] == 200
    assert rows["plain"]["capability"] == pytest.approx(0.44)
    assert rows["plain"]["harmful refusal"] == pytest.approx(6 / 20)
    # p0: 8 complied of which 4 incoherent -> 4 coherent; p1: 6 complied, all coherent -> 10 of 20
    assert rows["plain"]["harmful coherent compliance"] == pytest.approx(10 / 20)
    assert rows["safety_mix"]["trials reached"] == "0/1" and pd.isna(rows["safety_mix"]["harmful refusal"])
    text = write_report(tmp_path, "x")
    assert "m0: not_reached (budget:steps), best capability 0.30 at step 800" in text
    ladder = {(r["method"], r["level"]): r for r in ladder_table(
        read_table(tmp_path, "trials").to_pandas(), read_table(tmp_path, "checkpoints").to_pandas(),
        read_table(tmp_path, "judgments").to_pandas()).to_dict("records")}
    assert ladder[("plain", "0.2")]["harmful refusal"] == pytest.approx((9 + 4) / 20)  # p0 at step 50, p1 at 300
    assert ladder[("plain", "0.4")]["harmful refusal"] == pytest.approx(6 / 20)
    assert ladder[("safety_mix", "0.2")]["trials"] == 1 and ("safety_mix", "0.4") not in ladder
    assert "Safety along the capability ladder" in text and "| p0 | reached |" in text
    assert (tmp_path / "report.md").read_text() == text
