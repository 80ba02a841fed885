"""Local stand-ins for docs/examples/own_model.yaml (issue 26 §2): files in the published layouts (GSM8K's question /
answer with '#### <number>', the HarmBench, StrongREJECT and XSTest fixture CSVs), a judge model with room for the
HarmBench classifier's prompt, and the overrides that point the spec at them. Shared by tests/test_own_model.py
(the plan) and tests/test_e2e.py (the run)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
OWN = "docs/examples/own_model.yaml"
SUITES = REPO / "tests" / "fixtures" / "suites"
OWN_SUITES = {"harmbench", "strongreject", "xstest"}
# the suites' items as the fixtures hold them: HarmBench 6 rows less its copyright one, StrongREJECT 4, XSTest's
# 3 safe prompts (only: comply)
OWN_SUITE_ITEMS = {"harmbench": 5, "strongreject": 4, "xstest": 3}


def gsm8k_file(path: Path, n: int, start: int = 0) -> Path:
    """A parquet file in GSM8K's layout: 'question', and 'answer' with its worked steps and '#### <number>'."""
    questions, answers = [], []
    for i in range(start, start + n):
        a, b = 10 + i % 50, 20 + (i * 7) % 60
        questions.append(f"what is {a} plus {b} ?")
        answers.append(f"{a} plus {b} makes <<{a}+{b}={a + b}>>{a + b}.\n#### {a + b}")
    pq.write_table(pa.table({"question": questions, "answer": answers}), path)
    return path


def gsm8k_from_world(source: Path, target: Path, limit: int) -> Path:
    """The demo world's addition problems in GSM8K's layout (the worked steps left empty, '#### <sum>')."""
    rows = [json.loads(line) for line in source.read_text().splitlines()[:limit]]
    pq.write_table(pa.table({"question": [r["prompt"] for r in rows],
                             "answer": [f"#### {r['answer']}" for r in rows]}), target)
    return target


def long_context_copy(model: Path, directory: Path, positions: int = 2048) -> Path:
    """``model`` with room for ``positions`` tokens (rotary positions need no new weights): HarmBench's classifier
    prompt alone is ~1,200 tokens."""
    shutil.copytree(model, directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "max_position_embeddings": positions}))
    return directory


def own_model_overrides(model: Path, guard: Path, classifier: Path, train: Path, test: Path, out: Path) -> list[str]:
    """The spec's inputs pointed at local stand-ins, and its lengths cut to a 256-position model."""
    return [f"output_dir={out}", f"model.path={model}", f"task.train_file={train}", f"task.confirm_file={test}",
            f"eval.suites.0.file={SUITES / 'harmbench_behaviors.csv'}",
            f"eval.suites.1.file={SUITES / 'strongreject.csv'}", f"eval.suites.2.file={SUITES / 'xstest_prompts.csv'}",
            f"eval.llm_judges.0.model={guard}", f"eval.llm_judges.1.model={classifier}",
            "train.max_seq_len=null", "eval.max_model_len=null", "task.max_new_tokens=16", "eval.max_new_tokens=16"]


# The run at micro size on 2 CPUs: one seed, one trial at a time, full fine-tuning under ZeRO-3 (LoRA learns this
# task slowly; the LoRA path runs in the submitted e2e job), the micro task's target, a CPU pool of one replica.
MICRO_SIZE = ["seeds=[0]", "sweep.max_concurrent_trials=1", "train.use_gpu=false", "train.precision=fp32",
              "train.gradient_checkpointing=false", "train.mode=full", "train.zero_stage=3", "train.num_workers=2",
              "train.cpus_per_worker=0.5", "train.learning_rates=[0.003]", "train.max_steps=400",
              "train.eval_every=20", "train.near_margin=0.02", "task.selection_from_train=40", "task.eval_size=40",
              "task.confirm_size=120", "task.target=0.075", "task.tolerance=0.025", "eval.replicas=1",
              "eval.cpus_per_replica=1", "eval.gpus_per_replica=0"]
