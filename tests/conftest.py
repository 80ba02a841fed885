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
    from capsafe.ray_shell import cache_root
    from capsafe.spec import load_spec
    from capsafe.world import build_world

    spec = load_spec(REPO / "tests" / "specs" / "micro.yaml")
    return build_world(spec.world, cache_root() / "worlds", log=lambda m: None)
