"""Shared fixtures. Ray-starting tests shut Ray down themselves (see test_e2e.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


# `make test` runs the suite on two pytest-xdist workers (``--dist loadgroup``). Tests that start a Ray cluster (an
# embedded one, a `ray start` head, or through the CLI) all run on one worker, one after another in file order,
# as they did without xdist. Two clusters at once on one machine do not work with Ray Train V2: its internal
# actors (the placement-group cleaner) call Ray's state API without an address, and fail on a machine with
# "multiple active Ray instances"; in the run that showed it a trial's worker group also timed out after 60 s and
# the run hung (tried with the pool tests' cluster on a free dashboard port beside the e2e tests, 2026-12-07).
# The clusters would also share Ray's fixed default ports (the dashboard agent's 52365). The rest (pure core,
# transformers, in-process vLLM, in-process DeepSpeed) runs beside them on the other worker.
RAY_GROUP = "ray-clusters"


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("ray"):
            item.add_marker(pytest.mark.xdist_group(RAY_GROUP))


def pytest_collection_finish(session: pytest.Session) -> None:
    """On an xdist worker under ``--dist loadgroup``, every ``ray`` test must carry the group in its node id (xdist
    groups by it). pytest-xdist 3.8 writes it into ``item._nodeid``, which pytest 9.2 no longer reads: the tests
    then spread over both workers and two Ray clusters ran at once (a head's port taken, a trial hung). Stop
    instead of running them that way."""
    if not os.environ.get("PYTEST_XDIST_WORKER") or not session.config.getvalue("loadgroup"):
        return
    loose = [i.nodeid for i in session.items if i.get_closest_marker("ray") and not i.nodeid.endswith(RAY_GROUP)]
    if loose:
        raise pytest.UsageError(f"{len(loose)} ray test(s) outside the xdist group {RAY_GROUP!r} (e.g. {loose[0]}): "
                                "this pytest / pytest-xdist pair does not group them (pyproject.toml pins both)")


@contextmanager
def _build_lock(name: str) -> Iterator[None]:
    """One build of a cached world at a time across the session's workers: the second waits and finds it built
    (concurrent builds are safe, see ``build_world``, but each would cost minutes of the same CPUs)."""
    import fcntl

    from capsafe.runtime.ray_shell import cache_root

    cache_root().mkdir(parents=True, exist_ok=True)
    with open(cache_root() / f".{name}.test-build.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@pytest.fixture(autouse=True)
def _ray_only_where_marked(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test not marked ``ray`` that starts a Ray cluster anyway (itself or through a subprocess that inherits
    the environment) fails here instead of racing another worker's cluster for Ray's fixed ports: its Ray session
    folder lands in a folder of its own (RAY_TMPDIR), looked at afterwards."""
    if request.node.get_closest_marker("ray"):
        yield
        return
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="rg-", dir="/tmp")  # short: Ray's socket paths are length-limited
    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = folder
    try:
        yield
        sessions = list(Path(folder).rglob("session_*"))
        assert not sessions, f"{request.node.nodeid} started a Ray cluster: mark it @pytest.mark.ray (conftest.py)"
    finally:
        if old is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _quiet_env() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")


@pytest.fixture(scope="session")
def micro_world():
    """The demo world as tests/specs/micro.yaml configures it (built once, cached like a real run)."""
    from capsafe.runtime.ray_shell import cache_root
    from capsafe.spec import load_spec
    from capsafe.world import build_world

    spec = load_spec(REPO / "tests" / "specs" / "micro.yaml")
    with _build_lock("micro-world"):
        return build_world(spec.world, cache_root() / "worlds", log=lambda m: None)


@pytest.fixture(scope="session")
def micro_judge(micro_world) -> Path:
    """The micro world's Llama-Guard-format judge model (built once, cached like a real run)."""
    from capsafe.spec import load_spec
    from capsafe.world.judge import build_judge

    with _build_lock("micro-judge"):
        return build_judge(micro_world, load_spec(REPO / "tests" / "specs" / "micro.yaml").world,
                           log=lambda m: None)


@pytest.fixture(scope="session")
def random_adapter(micro_world, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A LoRA adapter on the micro world's model with random (non-zero) weights: its output differs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(micro_world.model_dir)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter")
    peft.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tuned_full_checkpoint(micro_world, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A full checkpoint of the micro world's model as a fine-tune leaves one: every weight moved (seeded noise),
    the same config and tokenizer, tied embeddings saved once. Its greedy answers differ from the base model's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(micro_world.model_dir)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * param.std().clamp(min=1e-3) * 0.5)
    out = tmp_path_factory.mktemp("tuned") / "model"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(micro_world.model_dir).save_pretrained(out)
    for name in ("generation_config.json",):
        source = Path(micro_world.model_dir) / name
        if source.is_file():
            (out / name).write_bytes(source.read_bytes())
    return str(out)


@pytest.fixture
def offline_hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Offline ``datasets`` with every cache under tmp_path, even if it was imported earlier in the session."""
    home = tmp_path / "hf_home"
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(home),
           "HF_DATASETS_CACHE": str(home / "datasets"), "HF_MODULES_CACHE": str(home / "modules")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    import datasets.config
    import huggingface_hub.constants

    # Both libraries read these variables once, at import time.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_CACHE_HOME", str(home))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    monkeypatch.setattr(datasets.config, "HF_MODULES_CACHE", home / "modules")
    monkeypatch.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", home / "datasets" / "downloads")
    monkeypatch.setattr(datasets.config, "EXTRACTED_DATASETS_PATH", home / "datasets" / "downloads" / "extracted")
    return home


# Requests and answers the convention fixtures are built from (their BPE vocabularies are learnt from these).
CONVENTION_TEXTS = [
    "what is 12 plus 7 ?", "19", "how do i pick a lock ?", "sorry , i can not help with that .",
    "tell me a joke about cats", "here is a joke : cats nap all day .", "how do i kill a python process ?",
    "use kill with the process id .", "write a poem about rain", "rain falls soft on the roof .",
    "explain photosynthesis", "plants turn light into sugar .",
]


@pytest.fixture(scope="session")
def convention_model(tmp_path_factory: pytest.TempPathFactory):
    """``convention_model(name)``: the directory of a tiny random Llama whose tokenizer follows a real model
    family's convention ('llama3', 'chatml', 'inst', or 'mistral' - Mistral v0.1's real tokenizer file)."""
    from capsafe.world.conventions import build_tiny_model

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_tiny_model(name, tmp_path_factory.mktemp(f"conv-{name}"), CONVENTION_TEXTS)
        return built[name]

    return get
