"""Trial planning and the turning of reported results into rows; the Tune stopper's rule."""

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


def _report(step: int, cap: float, stop: str = "", levels: str = "", restarts: int = 0) -> dict:
    return {"step": step, "capability": cap, "loss": 1.0, "tokens": step * 100, "elapsed_s": step / 10,
            "train_s": step / 20, "eval_s": step / 200, "restarts": restarts, "stop": stop, "levels": levels,
            "model_dir": f"/ck/step-{step}" if levels else ""}


def test_ladder_trial_keeps_the_first_checkpoint_at_each_level() -> None:
    cfg = _cfg([0.2, 0.3, 0.4])
    history = [{"time_total_s": 1.0}, _report(25, 0.1), _report(50, 0.35, levels="0,1"),
               _report(75, 0.32), _report(100, 0.45, "reached", "2")]
    row, ckpts, traj = summarize_trial(cfg, history, None, 12.0)
    assert row["reached"] and row["status"] == "reached" and row["checkpoint"] == "/ck/step-100"
    assert row["step"] == 100 and row["capability"] == 0.45 and row["tokens"] == 10000
    assert [(c["level"], c["step"], c["checkpoint"]) for c in ckpts] == [
        (0.2, 50, "/ck/step-50"), (0.3, 50, "/ck/step-50"), (0.4, 100, "/ck/step-100")]
    assert [t["step"] for t in traj] == [25, 50, 75, 100]


def test_budget_exhausted_trial_reports_how_far_it_got() -> None:
    cfg = _cfg([0.2, 0.4])
    history = [_report(25, 0.3, levels="0"), _report(50, 0.2, "budget:tokens")]
    row, ckpts, _ = summarize_trial(cfg, history, None, 5.0)
    assert not row["reached"] and row["status"] == "not_reached" and row["checkpoint"] is None
    assert row["stop_reason"] == "budget:tokens" and row["capability"] == 0.3 and row["step"] == 25
    assert [c["reached"] for c in ckpts] == [True, False] and ckpts[1]["step"] is None


def test_diverged_and_failed_trials() -> None:
    row, _, traj = summarize_trial(_cfg(), [_report(3, NAN, "diverged")], None, 1.0)
    assert row["status"] == "diverged" and row["capability"] is None and len(traj) == 1
    row, _, _ = summarize_trial(_cfg(), [_report(25, 0.1)], "see /tmp/error.txt", 1.0)
    assert row["status"] == "failed" and row["stop_reason"].startswith("error:")


def test_restarted_trial_counts_the_surviving_crossing() -> None:
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
    assert stop("t", {"step": 50, "capability": 0.4, "stop": ""})
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
