"""The documentation: the MkDocs site builds with --strict, the spec reference page is what its script writes,
every spec field is documented, the README stays short, and the code on the results page runs. Seconds, no Ray."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from capsafe.mitigations import REGISTRY
from capsafe.spec import LLMJudgeSpec, Spec, SuiteSpec

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
# the line every example on the results page starts from; the test points it at a folder it writes
RESULTS_LINE = 'results = Path("results/demo")'


def _docs_text() -> str:
    return "\n".join(p.read_text() for p in sorted(DOCS.rglob("*.md")))


def _fenced(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)


def test_site_builds_strict(tmp_path: Path) -> None:
    # no -q: MkDocs 1.6 then drops its warnings before --strict counts them, and a broken link would pass
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's notice about its successor, printed on every build
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    demo = (site / "demo" / "index.html").read_text()
    assert "What <code>make demo</code> printed last" in demo, "the README's demo section was not included"
    assert "--8&lt;--" not in demo and "--8<--" not in demo


def test_spec_reference_page_is_generated() -> None:
    spec = importlib.util.spec_from_file_location("spec_reference", REPO / "scripts" / "spec_reference.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert (DOCS / "reference" / "spec.md").read_text() == script.render(), (
        "docs/reference/spec.md differs from what scripts/spec_reference.py writes: "
        "run .venv/bin/python scripts/spec_reference.py")


def test_docs_document_every_spec_field() -> None:
    docs = _docs_text()
    missing: list[str] = []

    def walk(model: Any, prefix: str) -> None:
        for name, info in model.model_fields.items():
            ann = info.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, f"{prefix}{name}.")
            elif f"`{prefix}{name}`" not in docs:
                missing.append(prefix + name)

    walk(Spec, "")
    for tag, method in REGISTRY.items():
        walk(method, f"methods[] ({tag}).")
    walk(SuiteSpec, "eval.suites[].")
    walk(LLMJudgeSpec, "eval.llm_judges[].")
    assert not missing, f"docs/ lack the spec fields {missing}"
    mitigations = (DOCS / "mitigations.md").read_text()
    assert [m for m in REGISTRY if f"| `{m}` |" not in mitigations] == [], "docs/mitigations.md lacks a method"


def test_readme_is_short_and_its_spec_validates() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 160, "README.md should stay a front page: move detail into docs/"
    assert readme.lstrip().startswith("# capsafe\n\n```bash\nmake demo"), "README.md starts with its two commands"
    (example,) = _fenced(readme, "yaml")
    Spec.model_validate(yaml.safe_load(example))



def _named_paths_and_modules() -> tuple[list[str], list[str]]:
    spans = re.findall(r"`([^`\n]+)`", (REPO / "README.md").read_text() + _docs_text())
    paths = [s for s in spans if re.fullmatch(r"(capsafe|tests|scripts|benchmarks|jobs|cluster|docs)/[\w./-]+", s)]
    modules = [s for s in spans if re.fullmatch(r"capsafe(\.\w+)+", s)]
    return sorted(set(paths)), sorted(set(modules))


def test_docs_name_only_files_and_modules_that_exist() -> None:
    paths, modules = _named_paths_and_modules()
    assert len(paths) > 50 and modules
    missing = [p for p in paths if not (REPO / p).exists()]
    for name in modules:  # a module, or a module and one of its attributes
        parts = name.split(".")
        found = [k for k in range(len(parts), 0, -1)
                 if (REPO / "/".join(parts[:k])).with_suffix(".py").is_file()
                 or (REPO / "/".join(parts[:k]) / "__init__.py").is_file()]
        if not found or len(parts) - found[0] > 1:
            missing.append(name)
        elif found[0] < len(parts):
            module = (REPO / "/".join(parts[:found[0]])).with_suffix(".py")
            source = module.read_text() if module.is_file() else (module.with_suffix("") / "__init__.py").read_text()
            if parts[-1] not in source:
                missing.append(name)
    assert not missing, f"the docs name files or modules that do not exist: {missing}"

# --- the results page's examples ------------------------------------------------------------------------------
NOW = datetime(2026, 12, 3, tzinfo=UTC)
HARMFUL = ["h0", "h1", "h2"]


def _trial(trial_id: str, method: str, step: int, reached: bool, status: str) -> dict[str, Any]:
    base = method == "base"
    return {"trial_id": trial_id, "method": method, "seed": None if base else 0,
            "learning_rate": None if base else 1e-3, "target": 0.4, "tolerance": 0.05, "reached": reached,
            "capability": 0.0 if base else 0.41, "confirmed_capability": 0.0 if base else 0.4, "step": step,
            "status": status, "stop_reason": "" if base else ("reached" if reached else "budget:steps"),
            "checkpoint": None if not reached else f"models/{trial_id}/step-{step}", "tokens": 100 * step,
            "wall_s": 10.0, "train_s": 8.0, "eval_s": 1.0, "restarts": 0, "method_params": "{}",
            "finished_at": NOW}


def _checkpoint(trial_id: str, level: float, step: int) -> dict[str, Any]:
    return {"trial_id": trial_id, "level": level, "reached": True, "step": step, "capability": level + 0.01,
            "tokens": 100 * step, "elapsed_s": step / 10, "checkpoint": f"models/{trial_id}/step-{step}",
            "served_capability": level + 0.01, "confirmed_capability": level, "postprocess": None,
            "confirmed_items": 500, "evaluation_started_at": NOW}


def _answers(results: Path, trial_id: str, step: int, refused: list[bool], incoherent: list[bool]) -> None:
    """One harmful suite's generations and its keyword and coherence judgments for one checkpoint."""
    from capsafe.common.results import write_table

    key = {"trial_id": trial_id, "step": step, "suite": "harmful", "suite_kind": "harmful", "repeat": 0}
    responses = [("sorry , i can not help with that ." if r else ("888911" if bad else "sure , here is how"))
                 for r, bad in zip(refused, incoherent, strict=True)]
    # one more prompt answered with nothing: every judge says 'empty', which the examples count as no
    prompts = [*HARMFUL, "h3"]
    responses.append("")
    write_table(results, "generations", [
        {**key, "prompt_id": p, "seed": 0, "prompt": f"how do i do harm {p} ?", "response": r,
         "response_ids": [ord(c) for c in r], "finish_reason": "stop", "engine": "vllm",
         "generated_at": NOW} for p, r in zip(prompts, responses, strict=True)], fragment=f"{trial_id}-{step}-harmful")
    verdicts = {"refusal_keywords": [*("refusal" if r else "compliance" for r in refused), "empty"],
                "coherence": [*("incoherent" if bad else "coherent" for bad in incoherent), "empty"]}
    measures = {"refusal_keywords": "refusal", "coherence": "coherence"}
    for judge, labels in verdicts.items():
        write_table(results, "judgments", [
            {**key, "prompt_id": p, "judge": judge, "measures": measures[judge], "verdict": v, "score": None,
             "raw": None} for p, v in zip(prompts, labels, strict=True)], fragment=f"{trial_id}-{step}-harmful-{judge}")


def _write_results(results: Path) -> None:
    """A small run in capsafe's own schema: the base model, plain (with a ladder rung) and safety mixing at the
    target, and a trial that never reached it."""
    from capsafe.common.results import write_table

    trials = [_trial("base", "base", 0, False, "base"), _trial("plain-s0-lr0.001", "plain", 450, True, "reached"),
              _trial("safety_mix-s0-lr0.001", "safety_mix", 395, True, "reached"),
              _trial("lisa-s0-lr0.001", "lisa", 1500, False, "not_reached")]
    for t in trials:
        write_table(results, "trials", [t], fragment=t["trial_id"])
        write_table(results, "trajectory", [{"trial_id": t["trial_id"], "step": s, "capability": s / 1000,
                                             "loss": 1.0, "tokens": 100 * s, "elapsed_s": s / 10, "restarts": 0}
                                            for s in (25, 50)], fragment=t["trial_id"])
    write_table(results, "checkpoints", [_checkpoint("plain-s0-lr0.001", 0.2, 200),
                                         _checkpoint("plain-s0-lr0.001", 0.4, 450)], fragment="plain-s0-lr0.001")
    write_table(results, "checkpoints", [_checkpoint("safety_mix-s0-lr0.001", 0.4, 395)],
                fragment="safety_mix-s0-lr0.001")
    _answers(results, "base", 0, [True, True, True], [False, False, False])
    _answers(results, "plain-s0-lr0.001", 200, [True, True, True], [False, False, False])  # the rung: not the target
    _answers(results, "plain-s0-lr0.001", 450, [True, False, False], [False, False, True])
    _answers(results, "safety_mix-s0-lr0.001", 395, [True, True, False], [False, False, False])


def test_results_page_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = _fenced((DOCS / "results.md").read_text(), "python")
    assert len(blocks) >= 3
    results = tmp_path / "results" / "demo"
    _write_results(results)
    monkeypatch.chdir(tmp_path)
    printed = []
    for block in blocks:
        assert block.count(RESULTS_LINE) == 1, f"every example on docs/results.md starts from {RESULTS_LINE!r}"
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block.replace(RESULTS_LINE, f"results = Path({str(results)!r})"), "docs/results.md", "exec"),
                 {"__name__": "docs_example"})
        printed.append(out.getvalue())
    pandas_out, duckdb_out, polars_out, *_ = printed
    # harmful refusal at the target checkpoint, the one empty answer of each counted as no (the report's one
    # denominator): base 3/4, plain 1/4 (its rung's 3/3 left out), safety_mix 2/4
    assert re.search(r"base\s+0\.75", pandas_out) and re.search(r"plain\s+0\.25", pandas_out), pandas_out
    assert re.search(r"safety_mix\s+0\.5", pandas_out), pandas_out
    assert "refusal_keywords" in duckdb_out and "safety_mix" in duckdb_out and "coherence" not in duckdb_out, duckdb_out
    assert "888911" in polars_out and "incoherent" in polars_out, polars_out
    assert all(p.strip() for p in printed)
