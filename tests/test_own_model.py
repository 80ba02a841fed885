"""Issue 26 §2: the "Run your own model" spec (docs/examples/own_model.yaml) as its user meets it: a plan before
anything is spent, on a locally built model of the same tokenizer convention (Llama 3's) and local files in the
published formats (GSM8K's question / answer with '#### <number>', HarmBench's, StrongREJECT's and XSTest's CSVs),
with no demo default anywhere. The spec's run end to end at micro size is in tests/test_e2e.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from own_model_stand_ins import OWN, REPO, gsm8k_file, long_context_copy, own_model_overrides


def test_the_plan_reads_every_input_and_bounds_the_gpu_hours(convention_model, tmp_path: Path) -> None:
    model = convention_model("llama3")
    train, test = gsm8k_file(tmp_path / "train.parquet", 400), gsm8k_file(tmp_path / "test.parquet", 50, 1000)
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "capsafe.cli", "validate", OWN, "--plan",
                           *own_model_overrides(model, model, long_context_copy(model, tmp_path / "judge"), train,
                                                test, out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    # every input with where it comes from, how many items the run uses and their token lengths
    assert re.search(rf"task.train_file: {re.escape(str(train))}: 100 training examples \(prompt \+ answer\), "
                     r"\d+-\d+ tokens", text), text
    assert re.search(r"task.eval_file: .*\(carved off the training data\): 300 capability prompts, \d+", text), text
    assert "task.confirm_file: " in text and ": 50 capability prompts" in text
    # HarmBench: 6 rows less the copyright one; XSTest: its 3 safe prompts (only: comply)
    assert re.search(r"suite 'harmbench' \(harmful\): .*harmbench_behaviors.csv: 5 prompts, \d+", text), text
    assert re.search(r"suite 'strongreject' \(harmful\): .*: 4 prompts", text), text
    assert re.search(r"suite 'xstest' \(overrefusal\): .*: 3 prompts", text), text
    assert "eval.llm_judges.1.model ('harmbench_cls', harmbench format)" in text
    assert "demo world" not in text
    # the context checks and the resources, then the GPU-hours bound from the budgets: 2 methods x 6 seeds,
    # 4 GPUs each, 3 h a trial; the pool's GPU beside training for 6 waves of 2 trials
    assert "every suite and capability prompt fits" in text and "context: training sequences up to" in text
    assert "capacity: the run holds at most CPU 72.2, GPU 9 at once; not checked against a cluster" in text, text
    assert "training: at most 144.0 GPU-hours (12 trial(s) x 4 GPU(s) x train.max_wall_s 10800 s)" in text, text
    assert "pool: 1 GPU(s) (1 replica(s) x eval.gpus_per_replica 1) held beside training, at most 18.0 GPU-hours" \
        in text, text
    assert not out.exists()  # a plan writes nothing


def test_the_unfilled_spec_names_the_benchmark_file_to_fetch() -> None:
    # as shipped the spec points at files the user downloads first: validate says which, exit 2, no traceback
    proc = subprocess.run([sys.executable, "-m", "capsafe.cli", "validate", OWN], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "harmbench_behaviors_text_all.csv' does not exist" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr

