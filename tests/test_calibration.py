"""A small run of the calibration harness (benchmarks/calibration.py) on the report's own functions: the bounds
are wide enough for its Monte Carlo error (60 replicates: s.e. about 3 points at 95 %) and still fail on the old
two-level bootstrap, which drew each seed's prompts independently."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest


@pytest.fixture(scope="module")
def calibration() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "calibration.py"
    spec = importlib.util.spec_from_file_location("calibration", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["calibration"] = module
    spec.loader.exec_module(module)
    return module


def test_the_seeds_interval_covers_in_the_crossed_design(calibration: ModuleType) -> None:
    # 5 seeds x 100 shared prompts whose difficulty varies widely (logit sd 2), seeds alike (sd 0.1): the prompt
    # sample dominates the variance of the mean. The old bootstrap covered 78 % (47 of 60) here, the crossed 97 %
    row = calibration.rate_coverage(calibration.World(seed_sd=0.1, prompt_sd=2.0), seeds=5, prompts=100, reps=60)
    assert row["value"] >= 0.88, row


def test_the_prompt_level_test_keeps_its_level(calibration: ModuleType) -> None:
    covered, significant, detectable = calibration.comparison_runs(calibration.World(), (1, 1), 100, reps=60)
    assert sum(significant) <= 8  # 5 % of 60 is 3; 8 or more has probability < 1 % under a calibrated test
    assert sum(covered) >= 51 and all(d > 0 for d in detectable)
