"""Issue 26 §5: `capsafe compare` puts several runs side by side and names the settings that differ; every
table row carries its run's id."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from capsafe.common.results import read_table, write_table

REPO = Path(__file__).resolve().parent.parent


def _run(folder: Path, run_id: str, lr: float, plain_refusals: int, confirmed: float = 0.41) -> Path:
    """A finished run's tables by hand: the base model refuses all 30 harmful prompts, plain ``plain_refusals``."""
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"run_id": run_id, "capsafe_commit": "abc123"}))
    (folder / "spec.json").write_text(json.dumps({"experiment": folder.name, "output_dir": str(folder.parent),
                                                  "train": {"learning_rates": [lr], "max_steps": 400},
                                                  "eval": {"suites": [{"name": "harmful", "kind": "harmful"}]}}))
    for tid, method, step in (("base", "base", 0), (f"plain-s0-lr{lr:g}", "plain", 100)):
        write_table(folder, "trials", [{
            "trial_id": tid, "method": method, "seed": 0, "learning_rate": lr, "target": 0.4, "tolerance": 0.05,
            "reached": method != "base", "capability": 0.0 if method == "base" else 0.41,
            "confirmed_capability": 0.0 if method == "base" else confirmed, "step": step,
            "status": "base" if method == "base" else "reached", "stop_reason": "reached", "checkpoint": None,
            "tokens": 10, "wall_s": 1.0, "train_s": 1.0, "eval_s": 0.1, "restarts": 0, "method_params": "{}",
            "finished_at": None}], fragment=tid)
        refusals = 30 if method == "base" else plain_refusals
        write_table(folder, "judgments", [
            {"trial_id": tid, "step": step, "suite": "harmful", "suite_kind": "harmful", "prompt_id": str(i),
             "repeat": 0, "judge": judge, "measures": measures, "score": None, "raw": None,
             "verdict": verdict(i < refusals)}
            for i in range(30)
            for judge, measures, verdict in (("refusal_keywords", "refusal",
                                              lambda r: "refusal" if r else "compliance"),
                                             ("coherence", "coherence", lambda r: "coherent"))], fragment=tid)
    write_table(folder, "checkpoints", [{
        "trial_id": f"plain-s0-lr{lr:g}", "level": 0.4, "reached": True, "step": 100, "capability": 0.41,
        "tokens": 10, "elapsed_s": 1.0, "checkpoint": None, "served_capability": 0.41,
        "confirmed_capability": confirmed, "confirmed_items": 500, "postprocess": None,
        "evaluation_started_at": None}], fragment="plain")
    return folder


def test_compare_aligns_matched_comparisons_and_names_what_differs(tmp_path: Path) -> None:
    a = _run(tmp_path / "a" / "lr-small", "run-a", 0.001, plain_refusals=5)
    b = _run(tmp_path / "b" / "lr-large", "run-b", 0.003, plain_refusals=29)
    # every row carries its run's id: the two runs' trials stack without their trial ids colliding
    assert set(read_table(a, "trials").column("run_id").to_pylist()) == {"run-a"}
    assert set(read_table(b, "judgments").column("run_id").to_pylist()) == {"run-b"}
    out = tmp_path / "compare.md"
    proc = subprocess.run([sys.executable, "-m", "capsafe.cli", "compare", str(a), str(b), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert out.read_text() == text
    assert "| lr-small | " in text and "| run-a | abc123 |" in text and "| run-b |" in text
    # the one setting that differs (output_dir and experiment are not settings of the measurement)
    settings = text.split("## Settings that differ", 1)[1].split("##", 1)[0]
    assert "| train.learning_rates | [0.001] | [0.003] |" in settings and "output_dir" not in settings
    assert "max_steps" not in settings
    # per method, run by run
    assert "| lr-small | plain | 1/1 | 0.41 |" in text and "| lr-large | plain | 1/1 | 0.41 |" in text
    # the matched comparison plain vs base under the keyword judge in one row: 25 of 30 more non-refusals is a
    # detectable loss in one run, 1 of 30 in the other is not; the runs disagree and the row says so
    row = next(line for line in text.splitlines() if line.startswith("| plain vs base | harmful | refusal_keywords"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4].startswith("+0.83 [") and cells[4].endswith(": less safe"), row
    assert cells[5].startswith("+0.03 [") and "no detectable" in cells[5] and cells[-1] == "NO", row


def test_compare_refuses_a_folder_without_results(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "capsafe.cli", "compare", str(tmp_path), str(tmp_path / "x")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "holds no trials table" in proc.stderr and "Traceback" not in proc.stderr


def test_a_comparison_not_at_equal_capability_is_marked_and_left_out_of_the_agreement(tmp_path: Path) -> None:
    # the second run's plain checkpoint confirmed at 0.30, outside the band [0.35, 0.45]: its plain-vs-base row is
    # no comparison at equal capability (its report does not count it), so only the first run's verdict stands
    a = _run(tmp_path / "a" / "in-band", "run-a", 0.001, plain_refusals=5)
    c = _run(tmp_path / "c" / "below-band", "run-c", 0.003, plain_refusals=29, confirmed=0.30)
    proc = subprocess.run([sys.executable, "-m", "capsafe.cli", "compare", str(a), str(c)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines()
               if line.startswith("| plain vs base | harmful | refusal_keywords"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert "NOT at equal capability" not in cells[4] and cells[4].endswith(": less safe"), row
    assert cells[5].endswith("(NOT at equal capability: plain outside the band)") and cells[-1] == "yes", row
