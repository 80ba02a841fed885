"""Issue 26, provenance: manifest.json says what produced a run - run id, capsafe's commit, the stack's versions,
each model's identity (a local directory's fingerprint, a hub id's cached revision) and the spec - and a resumed
or extended run appends what it ran with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capsafe.common.provenance import MANIFEST, model_identity, package_versions, write_manifest


def test_a_run_starts_the_manifest_and_a_resume_appends_to_it(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    paths = {"model.path": str(model), "eval.llm_judges.0.model": "meta-llama/Llama-Guard-3-8B",
             "task.train_file": "hf:openai/gsm8k"}
    first = write_manifest(tmp_path, {"experiment": "x"}, paths, "run")
    assert len(first["run_id"]) == 32 and first["event"] == "run" and first["spec"] == {"experiment": "x"}
    assert first["packages"]["torch"] and first["packages"]["pyarrow"]
    assert set(first["models"]) == {"model.path", "eval.llm_judges.0.model"}  # data files are not models
    assert first["models"]["model.path"]["files"] == 1
    again = write_manifest(tmp_path, {"experiment": "x"}, paths, "resume")
    assert again["run_id"] == first["run_id"] and [h["event"] for h in again["history"]] == ["resume"]
    assert json.loads((tmp_path / MANIFEST).read_text()) == again
    assert write_manifest(tmp_path, {}, paths, "run")["run_id"] != first["run_id"]  # --overwrite: a new run


def test_a_models_identity_follows_its_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    before = model_identity(str(model))["sha256"]
    (model / "config.json").write_text('{"hidden_size": 16}')
    assert model_identity(str(model))["sha256"] != before
    cache = tmp_path / "hub"
    ref = cache / "models--meta-llama--Llama-Guard-3-8B" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("abc123\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert model_identity("meta-llama/Llama-Guard-3-8B") == {"hub_id": "meta-llama/Llama-Guard-3-8B",
                                                             "revision": "abc123"}
    assert model_identity("org/not-cached")["revision"] is None
    assert set(package_versions()) >= {"capsafe", "torch", "vllm", "ray", "deepspeed"}
