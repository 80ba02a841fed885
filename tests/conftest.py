"""Shared fixtures. Ray-starting tests shut Ray down themselves (see test_e2e.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


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
    return build_world(spec.world, cache_root() / "worlds", log=lambda m: None)


@pytest.fixture(scope="session")
def micro_judge(micro_world) -> Path:
    """The micro world's Llama-Guard-format judge model (built once, cached like a real run)."""
    from capsafe.spec import load_spec
    from capsafe.world.judge import build_judge

    return build_judge(micro_world, load_spec(REPO / "tests" / "specs" / "micro.yaml").world, log=lambda m: None)


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
