"""`capsafe evaluate RESULTS_DIR [overrides]` (issue 26): what it may add to a finished run, and what it refuses
because the run's existing rows would change meaning. The real extension - a judge added to a finished micro
run, judged through a pool on the old generations - runs in tests/test_e2e.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from capsafe.extend import extension_problems
from capsafe.spec import Spec

REPO = Path(__file__).resolve().parent.parent
BASE = {"eval": {"llm_judges": [{"name": "guard", "prompt_variants": ["lg_terse"]}]}}


def _spec(**eval_fields: object) -> Spec:
    return Spec.model_validate({"eval": {**BASE["eval"], **eval_fields}})


def test_judges_variants_suites_and_pool_settings_may_be_added() -> None:
    sampled = _spec(temperature=0.7, repeats=2)  # repeats may grow (never shrink) where the run samples
    assert extension_problems(sampled, _spec(temperature=0.7, repeats=4)) == []
    assert any("eval.repeats can only grow" in p for p in extension_problems(sampled, _spec(temperature=0.7)))
    old = _spec()
    ok = _spec(llm_judges=[{"name": "guard", "prompt_variants": ["lg_terse", "lg_reworded"]},
                           {"name": "hb", "format": "harmbench"}],
               suites=[*[s.model_dump() for s in old.eval.suites],
                       {"name": "harmful_jb", "kind": "harmful", "jailbreak": "roleplay"}],
               replicas=4, max_models_per_replica=3)
    assert extension_problems(old, ok) == []


@pytest.mark.parametrize("change, says", [
    ({"max_new_tokens": 64}, "eval.max_new_tokens differs"),
    ({"temperature": 0.7}, "eval.temperature differs"),
    ({"refusal_keywords": ["advbench"]}, "eval.refusal_keywords differs"),
    ({"judges": ["coherence"]}, "eval.judges must keep"),
    ({"llm_judges": []}, "'guard' is gone"),
    ({"llm_judges": [{"name": "guard", "format": "harmbench"}]}, "'guard' changed"),
    ({"llm_judges": [{"name": "guard", "prompt_variants": ["lg_reworded"]}]}, "'guard' changed"),
    ({"suites": [{"name": "harmful", "kind": "harmful"}]}, "'overrefusal' is gone"),
])
def test_what_would_change_existing_rows_is_refused(change: dict, says: str) -> None:
    assert any(says in p for p in extension_problems(_spec(), _spec(**change)))
    assert any("'seeds' differs" in p for p in extension_problems(_spec(), Spec.model_validate(
        {**BASE, "seeds": [0, 1]})))


def test_the_cli_refuses_in_one_line_and_changes_nothing(tmp_path: Path) -> None:
    results = tmp_path / "x"
    results.mkdir()
    snapshot = json.dumps(_spec().model_dump(mode="json"), sort_keys=True, indent=1)
    (results / "spec.json").write_text(snapshot)
    for args, says in (([str(results), "eval.max_new_tokens=64"], "eval.max_new_tokens differs"),
                       ([str(tmp_path)], "holds no spec.json")):
        proc = subprocess.run([sys.executable, "-m", "capsafe.cli", "evaluate", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and says in proc.stderr, proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert (results / "spec.json").read_text() == snapshot
    assert sorted(p.name for p in results.iterdir()) == ["spec.json"]
