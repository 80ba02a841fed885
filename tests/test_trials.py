"""Trial planning and the turning of reported results into rows; the Tune stopper's rule."""

import json
from pathlib import Path

from capsafe.spec import load_spec
from capsafe.train.config import TrialConfig
from capsafe.train.trials import plan_trials, summarize_trial

REPO = Path(__file__).resolve().parent.parent
NAN = float("nan")


def _cfg(levels: list[float] | None = None) -> TrialConfig:
    spec = load_spec(REPO / "jobs" / "demo.yaml", ["seeds=[0, 1]", "train.learning_rates=[0.001, 0.0003]"])
    trials = plan_trials(spec, {k: f"/data/{k}" for k in spec.data_paths()}, Path("/ck"))
    assert len(trials) == 3 * 2 * 2 and len({t.trial_id for t in trials}) == 12
    mix = next(t for t in trials if t.method == "safety_mix")
    assert [s.name for s in mix.extra_sources] == ["general", "safety"]
    plain = next(t for t in trials if t.method == "plain")
    assert [s.name for s in plain.extra_sources] == ["general"]
    task_only = next(t for t in trials if t.method == "task_only")
    assert task_only.extra_sources == ()  # the task data alone: no general data mixed in
    assert mix.extra_sources[1].weight == 0.05
    assert trials[0].checkpoint_dir == "/ck/plain-s0-lr0.001"
    cfg = trials[0]
    if levels:
        cfg = cfg.model_copy(update={"levels": tuple(levels), "target": levels[-1]})
    return cfg


def _report(step: int, cap: float, stop: str = "", levels: str = "", restarts: int = 0,
            kept: dict[str, tuple[int, float]] | None = None) -> dict:
    """A train loop report; ``kept`` maps each level index decided here to the (step, capability) it keeps
    (default: this evaluation itself)."""
    decided = {i: (kept or {}).get(i, (step, cap)) for i in filter(None, levels.split(","))}
    records = {i: {"step": s, "capability": c, "tokens": s * 100, "elapsed_s": s / 10, "model_dir": f"/ck/step-{s}",
                   "postprocess": ""} for i, (s, c) in decided.items()}
    return {"step": step, "capability": cap, "loss": 1.0, "tokens": step * 100, "elapsed_s": step / 10,
            "train_s": step / 20, "eval_s": step / 200, "restarts": restarts, "stop": stop, "candidate": "",
            "levels": levels, "kept": json.dumps(records) if records else "",
            "model_dir": f"/ck/step-{step}" if levels else ""}


def test_ladder_trial_keeps_the_candidate_each_level_chose() -> None:
    cfg = _cfg([0.2, 0.3, 0.4])
    # 0.2 and 0.3 decided at step 50 (0.35), keeping candidates 0.19 (step 25) and 0.35 itself; the target
    # decided at step 100 (0.45), keeping the in-band candidate 0.38 at step 75
    history = [{"time_total_s": 1.0}, _report(25, 0.19), _report(50, 0.35, levels="0,1", kept={"0": (25, 0.19)}),
               _report(75, 0.38), _report(100, 0.45, "reached", "2", kept={"2": (75, 0.38)})]
    row, ckpts, traj = summarize_trial(cfg, history, None, 12.0)
    assert row["reached"] and row["status"] == "reached" and row["checkpoint"] == "/ck/step-75"
    assert row["step"] == 75 and row["capability"] == 0.38 and row["tokens"] == 10000  # tokens: when it stopped
    assert [(c["level"], c["step"], c["capability"], c["checkpoint"], c["tokens"]) for c in ckpts] == [
        (0.2, 25, 0.19, "/ck/step-25", 2500), (0.3, 50, 0.35, "/ck/step-50", 5000),
        (0.4, 75, 0.38, "/ck/step-75", 7500)]
    assert [t["step"] for t in traj] == [25, 50, 75, 100]  # the trajectory keeps every evaluation


def test_budget_exhausted_trial_reports_how_far_it_got() -> None:
    cfg = _cfg([0.2, 0.4])
    history = [_report(25, 0.3, levels="0"), _report(50, 0.2, "budget:tokens")]
    row, ckpts, _ = summarize_trial(cfg, history, None, 5.0)
    assert not row["reached"] and row["status"] == "not_reached" and row["checkpoint"] is None
    assert row["stop_reason"] == "budget:tokens" and row["capability"] == 0.3 and row["step"] == 25
    assert [c["reached"] for c in ckpts] == [True, False] and ckpts[1]["step"] is None


def test_a_budget_spent_inside_the_band_keeps_its_best_candidate() -> None:
    cfg = _cfg([0.4])
    history = [_report(25, 0.37), _report(50, 0.36, "budget:steps", "0", kept={"0": (25, 0.37)})]
    row, ckpts, _ = summarize_trial(cfg, history, None, 5.0)
    assert row["reached"] and row["status"] == "reached" and row["stop_reason"] == "budget:steps"
    assert row["step"] == 25 and ckpts[0]["checkpoint"] == "/ck/step-25"


def test_diverged_and_failed_trials() -> None:
    row, _, traj = summarize_trial(_cfg(), [_report(3, NAN, "diverged")], None, 1.0)
    assert row["status"] == "diverged" and row["capability"] is None and len(traj) == 1
    row, _, _ = summarize_trial(_cfg(), [_report(25, 0.1)], "see /tmp/error.txt", 1.0)
    assert row["status"] == "failed" and row["stop_reason"].startswith("error:")


def test_restarted_trial_counts_the_surviving_decision() -> None:
    cfg = _cfg([0.2, 0.4])
    history = [_report(25, 0.25, levels="0"), _report(25, 0.25, levels="0", restarts=1),
               _report(50, 0.41, "reached", "1", restarts=1)]
    row, ckpts, traj = summarize_trial(cfg, history, None, 9.0)
    assert row["restarts"] == 1 and len(traj) == 3 and ckpts[0]["step"] == 25


def test_a_target_that_g_formatting_would_round_is_still_reached() -> None:
    # levels used to travel as f"{x:g}" text: 0.8333333 came back as 0.833333, matched no level, and the trial
    # was recorded as not reached
    cfg = _cfg([0.5, 0.8333333])
    row, ckpts, _ = summarize_trial(cfg, [_report(25, 0.6, levels="0"), _report(50, 0.9, "reached", "1")], None, 1.0)
    assert row["reached"] and row["step"] == 50 and [c["reached"] for c in ckpts] == [True, True]


def test_capability_stopper() -> None:
    from capsafe.train.sweep import CapabilityStopper

    stop = CapabilityStopper(target=0.4)
    assert not stop("t", {"step": 25, "capability": 0.39, "stop": ""})
    assert not stop("t", {"step": 25, "capability": 0.36, "stop": ""})  # in the band: a candidate, go on
    assert stop("t", {"step": 50, "capability": 0.4, "stop": ""})  # the loop's own rule: stop_reason
    assert stop("t", {"step": 100, "capability": 0.1, "stop": "budget:steps"})
    assert stop("t", {"step": 3, "capability": NAN, "stop": "diverged"})
    assert not stop("t", {"time_total_s": 1.0}) and not stop.stop_all()


def test_the_trial_config_is_typed_frozen_and_survives_both_ray_boundaries() -> None:
    import pickle

    import pydantic
    import pytest

    from capsafe.train.sweep import trial_config

    cfg = _cfg()
    with pytest.raises(pydantic.ValidationError):
        cfg.lr = 1.0  # type: ignore[misc]  # frozen: a planned trial does not change
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # what a Ray Train worker receives
    plain = cfg.model_dump(mode="json")  # what Tune's parameter space, trial table and loggers see
    assert plain["trial_id"] == cfg.trial_id and plain["train"]["batch_size"] == cfg.train.batch_size
    assert trial_config({"trial": plain}) == cfg
    with pytest.raises(pydantic.ValidationError):
        trial_config({"trial": {**plain, "lr_typo": 1.0}})
    assert cfg.with_max_seq_len(77).train.max_seq_len == 77 and cfg.train.max_seq_len != 77
