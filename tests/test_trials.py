"""Trial planning and the turning of reported results into rows; the Tune stopper's rule."""

import math
from pathlib import Path

from capsafe.spec import load_spec
from capsafe.trials import plan_trials, summarize_trial

REPO = Path(__file__).resolve().parent.parent
NAN = float("nan")


def _cfg() -> dict:
    spec = load_spec(REPO / "jobs" / "demo.yaml", ["seeds=[0, 1]", "train.learning_rates=[0.001, 0.0003]"])
    trials = plan_trials(spec, {k: f"/data/{k}" for k in spec.data_paths()})
    assert len(trials) == 2 * 2 * 2 and len({t["trial_id"] for t in trials}) == 8
    mix = next(t for t in trials if t["method"] == "safety_mix")
    assert [s["name"] for s in mix["extra_sources"]] == ["general", "safety"]
    assert mix["extra_sources"][1]["weight"] == 0.05
    return trials[0]


def test_reached_trial_keeps_the_first_checkpoint_at_target() -> None:
    cfg = _cfg()
    # Tune's dataframe has NaN where a key was absent from a report
    history = [{"step": 25, "capability": 0.1, "loss": 1.0, "stop": "", "checkpoint_path": NAN},
               {"step": 50, "capability": 0.45, "loss": 0.5, "stop": "reached", "checkpoint_path": "/ck/50"}]
    row, traj = summarize_trial(cfg, history, None, 12.0)
    assert row["reached"] and row["status"] == "reached" and row["checkpoint"] == "/ck/50"
    assert row["step"] == 50 and row["capability"] == 0.45
    assert [t["step"] for t in traj] == [25, 50]


def test_budget_exhausted_trial_reports_how_far_it_got() -> None:
    cfg = _cfg()
    history = [{"step": 25, "capability": 0.3, "stop": ""}, {"step": 50, "capability": 0.2, "stop": "budget"}]
    row, _ = summarize_trial(cfg, history, None, 5.0)
    assert not row["reached"] and row["status"] == "not_reached" and row["checkpoint"] is None
    assert row["capability"] == 0.3 and row["step"] == 25


def test_diverged_trial_is_failed() -> None:
    row, traj = summarize_trial(_cfg(), [{"step": 3, "capability": NAN, "loss": math.inf, "stop": "diverged"}],
                                None, 1.0)
    assert row["status"] == "failed" and row["capability"] is None and len(traj) == 1


def test_capability_stopper() -> None:
    from capsafe.sweep import CapabilityStopper

    stop = CapabilityStopper(target=0.4, max_steps=100)
    assert not stop("t", {"step": 25, "capability": 0.39})
    assert stop("t", {"step": 50, "capability": 0.4})
    assert stop("t", {"step": 100, "capability": 0.1})
    assert stop("t", {"step": 3, "capability": NAN, "stop": "diverged"})
    assert not stop("t", {"time_total_s": 1.0}) and not stop.stop_all()
