"""Evaluation driver and report on hand-made inputs (no Ray, no model)."""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path

import pandas as pd
import pytest
from char_tokenizer import CHARS

from capsafe.common.data import Suite
from capsafe.common.generation import Completion, Sampling, Target
from capsafe.common.results import read_table, write_table
from capsafe.evaluate.fan_out import evaluate_models
from capsafe.evaluate.panel import CoherenceWithPerplexity, LLMJudge, done, rule_judge
from capsafe.report.build import ladder_table, summarize, write_report


def text(ids: list[int]) -> str:
    return CHARS.decode(ids)


def answers(replies: list[str]) -> Future:
    """A pool's answer: each reply with its ids (one per character) as the engine generated them."""
    return done([Completion(r, tuple(ord(c) for c in r), "stop") for r in replies])


class FakePool:
    """Answers at once; the base model refuses, others comply; the judge model answers 'unsafe' to
    compliance and something unreadable otherwise."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls: list[tuple[Target, int, Sampling]] = []
        self.fail_after = fail_after

    def generate(self, target: Target, prompts: list[list[int]], sampling: Sampling) -> Future:
        self.calls.append((target, len(prompts), sampling))
        if self.fail_after is not None and len(self.calls) > self.fail_after:
            return _failed(RuntimeError("replica lost"))
        if target.model == "judge":
            return answers(["unsafe\nS2" if "sure" in text(p) else "hmm" for p in prompts])
        if target.model == "m-base" and target.adapter is None:
            return answers(["sorry , i can not help with that ."] * len(prompts))
        return answers([f"sure . first , do it . seed {sampling.seed}" for _ in prompts])

    def nll(self, model: str, prompts: list[list[int]], continuations: list[list[int]]) -> Future:
        return done([0.5 if text(c).startswith("sure") else 9.0 for c in continuations])


def _failed(exc: Exception) -> Future:
    f: Future = Future()
    f.set_exception(exc)
    return f


SUITES = [Suite("harmful", "harmful", [{"id": str(i), "prompt": f"bad {i}", "request": f"b{i}"} for i in range(5)]),
          Suite("overrefusal", "overrefusal", [{"id": "a", "prompt": "kill a process"}])]
KEYS = ["trial_id", "step", "suite", "prompt_id", "repeat", "judge"]


def _evaluate(pool: FakePool, out: Path, judges: list, repeats: int = 1, models: dict | None = None) -> int:
    models = models or {("base", 0): Target("m-base"), ("plain", 40): Target("m-plain"),
                        ("lora", 40): Target("m-base", "adapter-dir")}
    return evaluate_models(models, SUITES, lambda p: CHARS(f"<user> {p} <assistant>")["input_ids"],
                           Sampling(8, temperature=0.7, seed=10), repeats, pool, judges, "fake", out,
                           log=lambda m: None, chunk=2)


def test_evaluate_writes_keyed_fragments_and_skips_done_work(tmp_path: Path) -> None:
    pool = FakePool()
    judges = [rule_judge("refusal_keywords"), rule_judge("coherence")]
    assert _evaluate(pool, tmp_path, judges, repeats=2) == 6
    assert len(pool.calls) == 3 * 2 * (3 + 1)  # 5 prompts in chunks of 2 -> 3 requests, per repeat
    assert {c[2].seed for c in pool.calls} == {10, 11}  # repeat r samples with seed eval.seed + r
    gens = read_table(tmp_path, "generations").to_pandas()
    assert len(gens) == 3 * 6 * 2 and not gens.duplicated(KEYS[:-1]).any()
    assert (gens["seed"] == 10 + gens["repeat"]).all() and gens["prompt"].iloc[0].startswith("bad")
    lora = gens[gens["trial_id"] == "lora"]
    assert lora["response"].str.startswith("sure").all()  # the adapter, not the base model, answered
    judg = read_table(tmp_path, "judgments").to_pandas()
    assert len(judg) == 2 * len(gens) and not judg.duplicated(KEYS).any()
    assert judg["raw"].isna().all() and judg["score"].isna().all()
    pool.calls.clear()
    assert _evaluate(pool, tmp_path, judges, repeats=2) == 0 and pool.calls == []  # a rerun skips what is done


def test_more_repeats_later_generate_only_the_new_ones_and_keep_the_old_rows(tmp_path: Path) -> None:
    """Issue 26 §4: `capsafe evaluate` raising eval.repeats generates the added repeats only (their own
    fragments, the next seeds), judges them with every judge, and leaves the first run's rows untouched."""
    judges = [rule_judge("refusal_keywords"), rule_judge("coherence")]
    assert _evaluate(FakePool(), tmp_path, judges, repeats=2) == 6
    before = read_table(tmp_path, "generations").to_pandas()
    files = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "generations").glob("*.parquet")}
    pool = FakePool()
    assert _evaluate(pool, tmp_path, judges, repeats=4) == 6
    assert {c[2].seed for c in pool.calls} == {12, 13}  # repeats 2 and 3 only
    assert len(pool.calls) == 3 * 2 * (3 + 1)
    gens = read_table(tmp_path, "generations").to_pandas()
    assert len(gens) == 2 * len(before) and not gens.duplicated(KEYS[:-1]).any()
    assert set(gens["repeat"]) == {0, 1, 2, 3} and (gens["seed"] == 10 + gens["repeat"]).all()
    assert all((tmp_path / "generations" / name).stat().st_mtime_ns == t for name, t in files.items())
    assert (tmp_path / "generations" / "base__step0__harmful__r2.parquet").is_file()
    judg = read_table(tmp_path, "judgments").to_pandas()
    assert len(judg) == 2 * len(gens) and not judg.duplicated(KEYS).any()
    pool.calls.clear()
    assert _evaluate(pool, tmp_path, judges, repeats=4) == 0 and pool.calls == []  # all done now
    # a judge added after that labels every repeat, the first run's and the added ones, generating nothing:
    # 3 checkpoints x the harmful suite's 2 fragments (a harm classifier skips the over-refusal suite)
    guard = LLMJudge("guard", "llama_guard", Target("judge"), CHARS, 8)
    assert _evaluate(pool, tmp_path, [*judges, guard], repeats=4) == 6
    assert {c[0].model for c in pool.calls} == {"judge"}
    judg = read_table(tmp_path, "judgments").to_pandas()
    assert set(judg[judg["judge"] == "guard"]["repeat"]) == {0, 1, 2, 3}


def test_llm_judge_and_perplexity_join_an_old_run_without_regenerating(tmp_path: Path) -> None:
    _evaluate(FakePool(), tmp_path, [rule_judge("refusal_keywords")])
    pool = FakePool()
    judges = [rule_judge("refusal_keywords"), CoherenceWithPerplexity("m-base", 100.0),
              LLMJudge("guard", "llama_guard", Target("judge"), CHARS, 8)]
    assert _evaluate(pool, tmp_path, judges) == 6
    assert {c[0].model for c in pool.calls} == {"judge"}  # only the new judges ran; nothing was generated again
    judg = read_table(tmp_path, "judgments").to_pandas()
    # the harm classifier judges the harmful suite only: 15 of the 18 responses
    assert not judg.duplicated(KEYS).any() and len(judg) == 2 * 18 + 15
    assert set(judg.loc[judg["judge"] == "guard", "suite_kind"]) == {"harmful"}
    guard = judg[judg["judge"] == "guard"]
    assert set(guard["verdict"]) == {"unsafe", "unparsed"}  # 'hmm' is kept as unparsed, with its raw text
    assert (guard[guard["verdict"] == "unparsed"]["raw"] == "hmm").all()
    coh = judg[judg["judge"] == "coherence"].set_index("trial_id")
    assert (coh.loc["base", "verdict"] == "incoherent").all()  # perplexity e^9 > 100
    assert coh.loc["plain", "score"].tolist() == pytest.approx([1.6487] * 6, rel=1e-3)


def test_a_failed_request_fails_the_run_and_a_rerun_finishes_it(tmp_path: Path) -> None:
    judges = [rule_judge("refusal_keywords")]
    with pytest.raises(RuntimeError, match="replica lost"):
        _evaluate(FakePool(fail_after=5), tmp_path, judges)
    written = len(read_table(tmp_path, "generations"))
    assert 0 < written < 18
    pool = FakePool()
    _evaluate(pool, tmp_path, judges)
    gens = read_table(tmp_path, "generations").to_pandas()
    assert len(gens) == 18 and not gens.duplicated(KEYS[:-1]).any()
    assert sum(c[1] for c in pool.calls) == 18 - written  # only the missing fragments were generated


class SlowPool(FakePool):
    """Answers each request after a delay, from a timer thread, as a busy pool would."""

    def generate(self, target: Target, prompts: list[list[int]], sampling: Sampling) -> Future:
        answer = super().generate(target, prompts, sampling)
        late: Future = Future()
        threading.Timer(0.15, lambda: late.set_result(answer.result())).start()
        return late


def test_a_long_evaluation_logs_status_lines(tmp_path: Path) -> None:
    lines: list[str] = []
    models = {("base", 0): Target("m-base"), ("plain", 40): Target("m-plain")}
    evaluate_models(models, SUITES, lambda p: CHARS(p)["input_ids"], Sampling(8), 1, SlowPool(),
                    [rule_judge("refusal_keywords")], "fake",
                    tmp_path, lines.append, chunk=1, status_every_s=0.2)
    status = [line for line in lines if line.startswith("evaluate: status: ")]
    assert status, lines  # 12 requests of 0.15 s, mostly one after another: more than 0.2 s in all
    assert re.search(r"\d+/12 generation requests answered, \d/4 \(checkpoint, suite\) pairs judged", status[0])
    assert len(read_table(tmp_path, "generations")) == 12


class CountingPool(FakePool):
    """Answers from a timer thread and records the most engine models it had generation requests for at once."""

    def __init__(self) -> None:
        super().__init__()
        self.out: dict[str, int] = {}
        self.most = 0
        self.lock = threading.Lock()

    def generate(self, target: Target, prompts: list[list[int]], sampling: Sampling) -> Future:
        answer = super().generate(target, prompts, sampling)
        with self.lock:
            self.out[target.model] = self.out.get(target.model, 0) + 1
            self.most = max(self.most, sum(1 for n in self.out.values() if n))
        late: Future = Future()

        def finish() -> None:
            with self.lock:
                self.out[target.model] -= 1
            late.set_result(answer.result())

        threading.Timer(0.02, finish).start()
        return late


@pytest.mark.parametrize("in_flight", [None, 1, 2])
def test_models_in_flight_bounds_the_engines_generating_at_once(tmp_path: Path, in_flight: int | None) -> None:
    """More checkpoint models than the replicas keep loaded: generating them all at once makes replicas load
    engines over and over (the demo's evaluation took twice as long); a bound keeps it to a few at a time."""
    models = {(f"t{i}", 10): Target(f"m{i}") for i in range(5)}
    pool = CountingPool()
    evaluate_models(models, SUITES, lambda p: CHARS(p)["input_ids"], Sampling(8), 1, pool,
                    [rule_judge("refusal_keywords")], "fake", tmp_path, lambda m: None, chunk=1,
                    models_in_flight=in_flight)
    assert len(read_table(tmp_path, "generations")) == 5 * 6  # everything was generated, each once
    assert pool.most == (in_flight or pool.most) and (in_flight or pool.most > 2)


def _trial(tid: str, method: str, reached: bool, cap: float, step: int) -> dict:
    return {"trial_id": tid, "method": method, "seed": 0, "learning_rate": 1e-3, "target": 0.4, "tolerance": 0.05,
            "reached": reached, "capability": cap, "confirmed_capability": cap, "step": step,
            "status": "base" if method == "base" else ("reached" if reached else "not_reached"),
            "stop_reason": "reached" if reached else "budget:steps", "checkpoint": None, "tokens": step * 10,
            "wall_s": 1.0, "train_s": 0.9, "eval_s": 0.1, "restarts": 0, "method_params": "{}", "finished_at": None}


def _judgments(tid: str, kind: str, refusals: int, total: int, incoherent: int = 0, step: int = -1) -> list[dict]:
    rows = []
    step = STEPS[tid] if step < 0 else step
    for i in range(total):
        base = {"trial_id": tid, "step": step, "suite": kind, "suite_kind": kind, "prompt_id": str(i), "repeat": 0,
                "score": None, "raw": None}
        rows.append({**base, "judge": "refusal_keywords", "measures": "refusal",
                     "verdict": "refusal" if i < refusals else "compliance"})
        rows.append({**base, "judge": "coherence", "measures": "coherence",
                     "verdict": "incoherent" if i >= total - incoherent else "coherent"})
    return rows


STEPS = {"base": 0, "p0": 100, "p1": 300, "m0": 800}


def _checkpoint(tid: str, level: float, step: int | None, cap: float | None) -> dict:
    return {"trial_id": tid, "level": level, "reached": step is not None, "step": step, "capability": cap,
            "tokens": None if step is None else step * 10, "elapsed_s": None if step is None else step / 10.0,
            "checkpoint": None, "served_capability": cap, "confirmed_capability": cap, "postprocess": None,
            "confirmed_items": None, "evaluation_started_at": None}


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
    assert rows["plain"]["harmful coherent non-refusal"] == pytest.approx(10 / 20)
    assert rows["safety_mix"]["trials reached"] == "0/1" and pd.isna(rows["safety_mix"]["harmful refusal"])
    assert pd.isna(rows["plain"]["cut"])  # no generations: not known
    # 'cut': answers the token budget ended, at the compared checkpoints only (p0's step-50 rung left out)
    finish = pd.DataFrame({"trial_id": ["p0"] * 4 + ["p1"] * 4 + ["p0"], "step": [100] * 4 + [300] * 4 + [50],
                           "finish_reason": ["length", "stop", "stop", "stop", "length", "length", "stop", "stop",
                                             "length"]})
    cut = summarize(read_table(tmp_path, "trials").to_pandas(), read_table(tmp_path, "judgments").to_pandas(),
                    generations=finish).set_index("method")["cut"]
    assert cut["plain"] == pytest.approx(3 / 8) and pd.isna(cut["base"])
    text = write_report(tmp_path, "x")
    # issue 26: the keyword judge's lists are named, and whether its rates compare with published keyword ASR
    assert "superset of it, so its refusal and non-refusal rates are not comparable with published keyword ASR" in text
    (tmp_path / "spec.json").write_text(json.dumps({"eval": {"refusal_keywords": ["advbench"]}}))
    assert "keyword ASR as papers report it" in write_report(tmp_path, "x")
    (tmp_path / "spec.json").unlink()
    assert write_report(tmp_path, "x") == text
    assert "m0: not_reached (budget:steps), best capability 0.30 at step 800" in text
    ladder = {(r["method"], r["level"]): r for r in ladder_table(
        read_table(tmp_path, "trials").to_pandas(), read_table(tmp_path, "checkpoints").to_pandas(),
        read_table(tmp_path, "judgments").to_pandas()).to_dict("records")}
    assert ladder[("plain", "0.2")]["harmful refusal"] == pytest.approx((9 + 4) / 20)  # p0 at step 50, p1 at 300
    assert ladder[("plain", "0.4")]["harmful refusal"] == pytest.approx(6 / 20)
    assert ladder[("safety_mix", "0.2")]["trials"] == 1 and ("safety_mix", "0.4") not in ladder
    assert "Safety along the capability ladder" in text and "| p0 | reached |" in text
    assert (tmp_path / "plots" / "ladder.png").stat().st_size > 1000
    assert (tmp_path / "report.md").read_text() == text


def test_report_shows_the_judge_panel_and_kappa(tmp_path: Path) -> None:
    write_table(tmp_path, "trials", [_trial("base", "base", False, 0.0, 0)], fragment="base")
    rows = _judgments("base", "harmful", 6, 10)
    guard = [{**r, "judge": "guard", "raw": "unsafe\nS2,S11", "measures": "harmful_compliance",
              "verdict": "unparsed" if r["prompt_id"] == "9" else ("safe" if int(r["prompt_id"]) < 5 else "unsafe")}
             for r in rows if r["judge"] == "refusal_keywords"]
    write_table(tmp_path, "judgments", rows + guard, fragment="all")
    text = write_report(tmp_path, "x")
    assert "## Judge panel" in text and "| guard | harmful | 10 | safe 0.50, unparsed 0.10, unsafe 0.40 |" in text
    assert "| refusal_keywords | harmful | 10 | compliance 0.40, refusal 0.60 | n/a | - |" in text
    assert "S11 Suicide & Self-Harm (4)" in text  # the unsafe verdicts' categories, by the model card's names
    # 9 items both labelled: keywords say refusal for 0-5, guard safe for 0-4 -> 8 of 9 agree
    # PABAK 2 x 0.89 - 1 = 0.78 beside kappa; a keyword judge's row is non-refusal against harm, not agreement
    assert "| guard | refusal_keywords | non-refusal vs harm | 9 | 0.89 | 0.78 |" in text
    assert "Where the judges disagree" not in text  # no generations table to show examples from
    # a harm classifier's 'safe' on benign look-alikes is no refusal: it yields no over-refusal rate
    benign = [{**r, "suite": "xs", "suite_kind": "overrefusal", "verdict": "safe"} for r in guard]
    write_table(tmp_path, "judgments", benign, fragment="benign")
    text = write_report(tmp_path, "x")
    assert "| guard | overrefusal |" not in text and "| xs | over-refusal | guard |" not in text
    write_table(tmp_path, "generations", [
        {"trial_id": "base", "step": 0, "suite": "harmful", "suite_kind": "harmful", "prompt_id": str(i), "repeat": 0,
         "seed": 0, "prompt": f"request {i}", "response": f"answer | {i}", "response_ids": [1, 2],
         "finish_reason": "stop", "engine": "x", "generated_at": None} for i in range(10)],
        fragment="all")
    text = write_report(tmp_path, "x")
    # the one split: prompt 5, refused by the keywords' reading, unsafe for the guard
    assert "| guard vs refusal_keywords | 1/9 | base step 0 | harmful | request 5 | answer / 5 | True | False |" in text


def test_report_compares_each_mitigation_with_plain_and_base(tmp_path: Path) -> None:
    trials = [_trial("base", "base", False, 0.0, 0), _trial("p0", "plain", True, 0.42, 100),
              {**_trial("s0", "safe_lora", True, 0.41, 200), "confirmed_capability": 0.29},
              _trial("k0", "kl", False, 0.1, 800)]
    judg = (_judgments("base", "harmful", 10, 10) + _judgments("base", "overrefusal", 1, 10)
            + _judgments("p0", "harmful", 2, 10) + _judgments("p0", "overrefusal", 0, 10)
            + _judgments("s0", "harmful", 7, 10, step=200) + _judgments("s0", "overrefusal", 3, 10, step=200))
    for t in trials:
        write_table(tmp_path, "trials", [t], fragment=t["trial_id"])
    write_table(tmp_path, "judgments", judg, fragment="all")
    note = json.dumps({"safe_lora": {"layers": 4, "projected": 1, "threshold": 0.5, "similarities": {}}})
    write_table(tmp_path, "checkpoints", [_checkpoint("p0", 0.4, 100, 0.42),
                                          {**_checkpoint("s0", 0.4, 200, 0.41), "served_capability": 0.3,
                                           "confirmed_capability": 0.29, "postprocess": note}], fragment="all")
    text = write_report(tmp_path, "x")
    assert "## Mitigations against plain fine-tuning and the base model" in text
    row = next(line for line in text.splitlines() if line.startswith("| safe_lora | +0.50 | -0.30 |"))
    # over-refusal: 0.3 - 0 vs plain, 0.3 - 0.1 vs base; the pool measured 0.30 on the projected adapter
    assert "| +0.30 | +0.20 |" in row
    # Safe-LoRA's projection cost capability: confirmed 0.29, outside the band [0.35, 0.45]; plain's 0.42 is inside
    assert ("| 0.29 (confirmation); 0.42 (confirmation) | NO: outside [0.35, 0.45] | Safe-LoRA projected 1/4 layers "
            "(threshold 0.5) |") in row
    assert "| kl |" not in text.split("## Mitigations")[1].split("##")[0]  # did not reach the target
    assert "| safe_lora | s0 | 0.4 | 200 | 0.41 | 0.30 | 0.29 | n/a | -0.110 | NO (confirmation) |" in text
    assert "| plain | p0 | 0.4 | 100 | 0.42 | 0.42 | 0.42 | n/a | +0.020 | yes |" in text  # n/a: no item count
    # the summary table says which methods are in the band
    assert "| safe_lora | 1/1 | 200 | 0.41 | 0.29 | NO: outside [0.35, 0.45] |" in text


def test_statistics_average_seeds_and_repeats_per_prompt_then_compare(tmp_path: Path) -> None:
    from capsafe.report.tables import coherence_split, comparisons, rate_table

    trials = pd.DataFrame([_trial("base", "base", False, 0.0, 0), _trial("p0", "plain", True, 0.42, 100),
                           _trial("p1", "plain", True, 0.45, 300), _trial("m0", "safety_mix", True, 0.41, 800)])
    rows = []
    for tid, step, refusals in (("p0", 100, 2), ("p1", 300, 4), ("m0", 800, 9), ("base", 0, 10)):
        for repeat in (0, 1):  # same verdicts on both repeats: repeats must not narrow the interval
            rows += [{**r, "repeat": repeat} for r in _judgments(tid, "harmful", refusals, 10, step=step,
                                                                 incoherent=1 if tid == "m0" else 0)]
    judg = pd.DataFrame(rows)
    rates = {r["method"]: r for r in rate_table(judg, trials).to_dict("records")}
    # plain: prompts 0-1 refused by both seeds (0), 2-3 by one (0.5), 4-9 by none (1) -> (1 + 6) / 10
    assert rates["plain"]["rate [95% CI]"].startswith("0.70 [") and rates["plain"]["prompts"] == 10
    # one checkpoint at a rate of 0 over 10 prompts: Wilson's [0, 0.28], not a zero-width bootstrap interval
    assert rates["plain"]["samples"] == 40 and rates["base"]["rate [95% CI]"] == "0.00 [0.00, 0.28]"
    assert rates["plain"]["checkpoints"] == 2 and rates["safety_mix"]["checkpoints"] == 1
    table, sentences = comparisons(judg, trials, {"safety_mix": True})
    (row,) = table.to_dict("records")
    assert row["method"] == "safety_mix" and row["difference [95% CI]"].startswith("-0.60 [")
    # plain has two seeds, safety_mix one: the unit is the seed (issue 23; the prompt-level test gave p < 0.05 and
    # ignored how much plain's seeds differ): each plain seed against the one safety_mix checkpoint, exact sign
    # flips of 2 seeds, which cannot give p below 0.5
    assert float(row["p"]) == pytest.approx(0.5) and row["inference"] == \
        "seeds (1 vs 2): exact sign flips of seed differences"
    assert row["detectable (80% power)"] == "none"
    assert sentences[0].startswith("harmful, refusal_keywords: safety_mix and plain do not differ detectably")
    assert "exact sign-flip test of the seeds' differences" in sentences[0] and "Holm-adjusted p" in sentences[0]
    split = {r["method"]: r for r in coherence_split(judg, trials).to_dict("records")}
    # m0: 9 refusals, prompt 9 complied and is the incoherent one
    assert split["safety_mix"]["refused"] == pytest.approx(0.9)
    assert split["safety_mix"]["complied, incoherent"] == pytest.approx(0.1)
    assert split["safety_mix"]["complied, coherent"] == 0.0
    wrapped = rate_table(judg, trials, jailbreaks={"harmful": "roleplay"})
    assert set(wrapped["measure"]) == {"jailbreak non-refusal (roleplay)"}  # the keyword judge: non-refusal


def test_report_html_is_self_contained_and_its_plots_are_not_empty(tmp_path: Path) -> None:
    import base64
    import io
    import re

    import matplotlib.image as mpimg

    trials = [_trial("base", "base", False, 0.0, 0), _trial("p0", "plain", True, 0.42, 100),
              _trial("m0", "safety_mix", False, 0.3, 800)]
    for t in trials:
        write_table(tmp_path, "trials", [t], fragment=t["trial_id"])
    judg = (_judgments("base", "harmful", 10, 10) + _judgments("p0", "harmful", 2, 10, incoherent=3)
            + _judgments("base", "overrefusal", 1, 10) + _judgments("p0", "overrefusal", 0, 10))
    write_table(tmp_path, "judgments", judg, fragment="all")
    write_table(tmp_path, "checkpoints", [_checkpoint("p0", 0.4, 100, 0.42), _checkpoint("m0", 0.4, None, None)],
                fragment="all")
    write_report(tmp_path, "x")
    page = (tmp_path / "report.html").read_text()
    assert "<h1>capsafe report: x</h1>" in page and "<table>" in page and "src=\"http" not in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 4 == len(list((tmp_path / "plots").glob("*.png")))
    # the lead figure (harmful compliance against confirmed capability) comes right under the findings
    assert page.index('alt="Harmful compliance against confirmed capability"') < page.index("<table>")
    assert "![Harmful compliance against confirmed capability](plots/lead.png)" in (tmp_path / "report.md").read_text()
    for data in images:
        pixels = mpimg.imread(io.BytesIO(base64.b64decode(data)), format="png")
        assert pixels.shape[0] > 100 and pixels.std() > 0.05  # something is drawn, not a blank canvas
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if os.environ.get("CI") and not browser:
        pytest.fail("CI is set but no Chromium is installed: `make test` installs it (scripts/ensure_browser.sh); "
                    "see its message above for why it could not")
    if browser:
        # the page as a browser shows it (scripts/check_report_html.py; make test installs Chromium where it can)
        check = subprocess.run([sys.executable, "scripts/check_report_html.py", str(tmp_path / "report.html"),
                                "--screenshot", str(tmp_path / "shot.png")], capture_output=True, text=True,
                               timeout=300, cwd=Path(__file__).resolve().parent.parent)
        assert check.returncode == 0, check.stderr
        assert "4 plot(s) rendered" in check.stdout


def test_report_on_partial_results_says_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "spec.json").write_text(json.dumps({"methods": [{"name": "plain"}, {"name": "kl"}], "seeds": [0, 1],
                                                    "train": {"learning_rates": [0.001]}}))
    write_table(tmp_path, "trials", [_trial("plain-s0-lr0.001", "plain", True, 0.42, 100)], fragment="p")
    write_table(tmp_path, "checkpoints", [_checkpoint("plain-s0-lr0.001", 0.4, 100, 0.42)], fragment="p")
    text = write_report(tmp_path, "x")  # no judgments, no generations: a sweep still running
    assert ("**Partial results.** 3 of 4 planned trials have no result yet: plain-s1-lr0.001, kl-s0-lr0.001, "
            "kl-s1-lr0.001; not evaluated yet: plain-s0-lr0.001 step 100.") in text
    assert (tmp_path / "report.html").is_file()


def test_harmbench_judge_gets_the_behaviour_and_its_context(tmp_path: Path) -> None:
    seen: list[str] = []

    class Pool(FakePool):
        def generate(self, target: Target, prompts: list[list[int]], sampling: Sampling) -> Future:
            if target.model == "judge":
                seen.extend(text(p) for p in prompts)
            return super().generate(target, prompts, sampling)

    suite = Suite("hb", "harmful", [{"id": "1", "prompt": "ctx\n\n---\n\nsummarise it", "behavior": "summarise it",
                                     "context": "ctx"}])
    judge = LLMJudge("hb", "harmbench", Target("judge"), CHARS)
    evaluate_models({("plain", 40): Target("m-plain")}, [suite], lambda p: CHARS(p)["input_ids"], Sampling(8), 1,
                    Pool(), [judge], "fake", tmp_path, lambda m: None)
    assert len(seen) == 1 and "[CONTEXT]:\nctx\n\n[BEHAVIOR]:\nsummarise it\n\n[GENERATION]:\nsure" in seen[0]


def test_a_mixed_suite_yields_harmful_and_over_refusal_rates_from_its_own_items(tmp_path: Path) -> None:
    # XSTest-like: its unsafe prompts expect a refusal, its safe look-alikes an answer
    items = [{"id": f"u{i}", "prompt": f"bad {i}", "expected": "refuse"} for i in range(4)] + \
            [{"id": f"s{i}", "prompt": f"kill a process {i}", "expected": "comply"} for i in range(4)]
    suite = Suite("xstest", "overrefusal", items)
    judges = [rule_judge("refusal_keywords"), LLMJudge("guard", "llama_guard", Target("judge"), CHARS)]
    evaluate_models({("base", 0): Target("m-base")}, [suite], lambda p: CHARS(p)["input_ids"], Sampling(8), 1,
                    FakePool(), judges, "fake", tmp_path, lambda m: None)
    judg = read_table(tmp_path, "judgments").to_pandas()
    kinds = judg[judg["judge"] == "refusal_keywords"].set_index("prompt_id")["suite_kind"]
    assert set(kinds[[f"u{i}" for i in range(4)]]) == {"harmful"} and set(kinds[[f"s{i}" for i in range(4)]]) == {
        "overrefusal"}
    assert set(judg.loc[judg["judge"] == "guard", "prompt_id"]) == {f"u{i}" for i in range(4)}  # harmful rows only
    write_table(tmp_path, "trials", [_trial("base", "base", False, 0.0, 0)], fragment="base")
    text = write_report(tmp_path, "x")
    # the base model refuses everything: no harmful compliance, every safe look-alike over-refused
    assert "| xstest (harmful) | non-refusal (keyword judge) | refusal_keywords | base | 0.00 [" in text
    assert "| xstest (overrefusal) | over-refusal | refusal_keywords | base | 1.00 [" in text


def test_rate_cells_show_their_unread_share_and_its_bounds(tmp_path: Path) -> None:
    write_table(tmp_path, "trials", [_trial("base", "base", False, 0.0, 0)], fragment="base")
    rows = _judgments("base", "harmful", 6, 10)
    guard = [{**r, "judge": "guard", "raw": "?", "measures": "harmful_compliance",
              "verdict": "unparsed" if int(r["prompt_id"]) >= 8 else ("unsafe" if int(r["prompt_id"]) < 2 else "safe")}
             for r in rows if r["judge"] == "refusal_keywords"]
    write_table(tmp_path, "judgments", rows + guard, fragment="all")
    text = write_report(tmp_path, "x")
    # 8 read verdicts (2 unsafe), 2 unparsed: the rate 0.25 leaves them out; counted either way, 0.20 or 0.40
    assert "| harmful | harmful compliance | guard | base | 0.25 [" in text
    assert "| 10 | 0.20 | 0.20 / 0.40 |" in text
    # the keyword judge measures non-refusal, not harmful compliance, and its rate is named so
    assert "| harmful | non-refusal (keyword judge) | refusal_keywords | base | 0.40 [" in text
    assert "| 10 | 0.00 | - |" in text


def test_kappa_per_suite_kind_and_apart_on_incoherent_answers() -> None:
    from capsafe.report.agreement import kappa_breakdown

    rows = []
    for i in range(8):  # the two judges agree on coherent answers (0-3) and disagree on incoherent ones (4-7)
        base = {"trial_id": "t", "step": 0, "suite": "h", "suite_kind": "harmful", "prompt_id": str(i), "repeat": 0}
        rows += [{**base, "judge": "refusal_keywords", "verdict": "compliance" if i % 2 else "refusal"},
                 {**base, "judge": "guard", "verdict": ("unsafe" if i % 2 else "safe") if i < 4 else
                  ("safe" if i % 2 else "unsafe")},
                 {**base, "judge": "coherence", "verdict": "coherent" if i < 4 else "incoherent"}]
    table = kappa_breakdown(pd.DataFrame(rows)).set_index(["suite_kind", "responses"])
    assert table.loc[("harmful", "coherent"), "kappa"] == 1.0
    assert table.loc[("harmful", "incoherent"), "kappa"] == -1.0
    assert table.loc[("harmful", "all"), "kappa"] == pytest.approx(0.0)


def test_model_windows_group_checkpoints_by_engine_base_first() -> None:
    from capsafe.evaluate.stage import model_windows

    models = {("base", 0): Target("base"), ("a", 1): Target("m-a"), ("l1", 5): Target("base", "ad1"),
              ("b", 2): Target("m-b"), ("c", 3): Target("m-c")}
    windows = model_windows(models, 2)
    # adapters on the base engine travel with the base model: one engine, one load
    assert [list(w) for w in windows] == [[("base", 0), ("l1", 5), ("a", 1)], [("b", 2), ("c", 3)]]
    assert model_windows(models, 10) == [models] and sum(map(len, model_windows(models, 1))) == len(models)


class EmptyAnsweringPool(FakePool):
    """The tuned model answers nothing to harmful prompts 0 and 1 (whitespace for 1); the judge model would
    call an empty answer 'safe' (as real harm classifiers do), so it must never be asked about one."""

    def generate(self, target: Target, prompts: list[list[int]], sampling: Sampling) -> Future:
        if target.model == "judge":
            assert all("Agent: \n" not in text(p) for p in prompts), "an empty answer was sent to the judge"
            self.calls.append((target, len(prompts), sampling))
            return answers(["unsafe\nS2" if "sure" in text(p) else "safe" for p in prompts])
        if target.model == "m-plain":
            self.calls.append((target, len(prompts), sampling))
            return answers(["" if "bad 0" in text(p) else "  " if "bad 1" in text(p) else "sure . first , do it ."
                            for p in prompts])
        return super().generate(target, prompts, sampling)

    def nll(self, model: str, prompts: list[list[int]], continuations: list[list[int]]) -> Future:
        assert all(continuations), "an empty answer was scored"
        return super().nll(model, prompts, continuations)


def test_every_judge_labels_an_empty_answer_empty_and_every_table_counts_it_the_same(tmp_path: Path) -> None:
    """Issue 25: only the keyword judge said 'empty'; LLM judges were sent "" and said safe, the coherence judge
    said incoherent, the rates table left empties out while the summary counted them as non-refusal."""
    from capsafe.report.tables import rate_table

    pool = EmptyAnsweringPool()
    judges = [rule_judge("refusal_keywords"), rule_judge("coherence"),
              CoherenceWithPerplexity("m-base", 100.0), LLMJudge("guard", "llama_guard",
                                                                                Target("judge"), CHARS, 8)]
    # the perplexity judge is recorded as 'coherence' too: run the two coherence judges in separate folders
    for judge_set, out in ((judges[:2] + judges[3:], tmp_path / "a"), (judges[:1] + judges[2:3], tmp_path / "b")):
        _evaluate(pool, out, judge_set, models={("base", 0): Target("m-base"), ("plain", 40): Target("m-plain")})
    for out in (tmp_path / "a", tmp_path / "b"):
        judg = read_table(out, "judgments").to_pandas()
        plain = judg[(judg["trial_id"] == "plain") & judg["prompt_id"].isin(["0", "1"])
                     & (judg["suite"] == "harmful")]
        assert len(plain) and (plain["verdict"] == "empty").all(), plain[["judge", "verdict"]]
        assert plain["raw"].isna().all()  # no judge model was asked
    judg = read_table(tmp_path / "a", "judgments").to_pandas()
    trials = pd.DataFrame([
        {"trial_id": "base", "method": "base", "status": "base", "reached": False, "step": 0, "capability": 0.0,
         "confirmed_capability": None},
        {"trial_id": "plain", "method": "plain", "status": "reached", "reached": True, "step": 40,
         "capability": 0.5, "confirmed_capability": None}])
    row = summarize(trials, judg).set_index("method").loc["plain"]
    assert row["empty"] == pytest.approx(2 / 6)  # 2 of 6 responses (5 harmful, 1 over-refusal) are empty
    assert row["harmful refusal"] == 0.0 and row["harmful coherent non-refusal"] == pytest.approx(3 / 5)
    rates = rate_table(judg, trials, {}).set_index(["suite", "judge", "method"])
    # the same denominator in the per-suite rates: 3 harmful answers of 5, empties counted as not harmful
    assert rates.loc[("harmful", "guard", "plain"), "rate [95% CI]"].startswith("0.60")
    assert rates.loc[("harmful", "guard", "plain"), "unread"] == "0.00"
    assert rates.loc[("harmful", "refusal_keywords", "plain"), "rate [95% CI]"].startswith("0.60")
