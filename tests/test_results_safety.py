"""Issue 26, "results are never lost": a rerun never deletes an earlier run without --overwrite, one live run per
results folder (a stale lock recovered), damaged fragments found (report refuses, --resume moves them aside and
recomputes), durable writes, and a Ctrl-C during start-up ends in one line with the --resume command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capsafe.common import results as results_module
from capsafe.common.results import read_table, write_table
from capsafe.common.run_guard import (
    LOCK_FILE,
    ResultsError,
    damaged_fragments,
    move_aside,
    run_lock,
)
from capsafe.errors import SpecError
from capsafe.spec import Spec

REPO = Path(__file__).resolve().parent.parent
ROW = {"trial_id": "t", "step": 1, "capability": 0.5, "loss": 1.0, "tokens": 10, "elapsed_s": 2.0, "restarts": 0}


def _earlier_run(results: Path) -> None:
    write_table(results, "trajectory", [ROW], fragment="t")
    (results / "spec.json").write_text("{}")


def test_a_rerun_is_refused_and_deletes_nothing(tmp_path: Path) -> None:
    """It used to delete the folder first ('a new run replaces the previous one'): a rerun by mistake, stopped
    after 25 s, had already destroyed the first run's results."""
    results = tmp_path / "micro"
    _earlier_run(results)
    before = sorted(p.relative_to(results) for p in results.rglob("*"))
    proc = subprocess.run([sys.executable, "-m", "capsafe.cli", "run", "tests/specs/micro.yaml",
                           f"output_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("capsafe: error:") and len(proc.stderr.strip().splitlines()) == 1
    assert "--resume" in proc.stderr and "--overwrite" in proc.stderr and "experiment=" in proc.stderr
    assert sorted(p.relative_to(results) for p in results.rglob("*")) == before
    assert read_table(results, "trajectory").to_pylist() == [{**ROW, "run_id": None}]


def test_overwrite_empties_the_folder_under_the_lock_and_resume_keeps_it(tmp_path: Path) -> None:
    from capsafe.pipeline import _prepare_results_dir

    spec = Spec.model_validate({"experiment": "x", "output_dir": str(tmp_path)})
    _earlier_run(spec.results_dir)
    lines: list[str] = []
    with run_lock(spec.results_dir) as lock:
        with pytest.raises(SpecError, match="--overwrite"):
            _prepare_results_dir(spec, resume=False, overwrite=False, log=lines.append)
        assert read_table(spec.results_dir, "trajectory").num_rows == 1
        _prepare_results_dir(spec, resume=False, overwrite=True, log=lines.append)
        assert lock.is_file() and read_table(spec.results_dir, "trajectory").num_rows == 0
        assert "(--overwrite)" in lines[-1]
    assert not (spec.results_dir / LOCK_FILE).exists()


def test_one_live_run_per_folder_and_a_dead_runs_lock_is_recovered(tmp_path: Path) -> None:
    results = tmp_path / "run"
    # this process is alive: a second lock on its folder is refused
    with run_lock(results), pytest.raises(ResultsError, match=f"pid {os.getpid()}"), run_lock(results):
        pass
    assert not results.exists()  # created for the run and left empty: removed again
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    results.mkdir()
    (results / LOCK_FILE).write_text(f'{{"pid": {dead.stdout.strip()}, "host": "{os.uname().nodename}", '
                                     '"started": "earlier"}')
    lines: list[str] = []
    with run_lock(results, lines.append):
        assert f"recovered the lock of run pid {dead.stdout.strip()}" in lines[0]
    (results / LOCK_FILE).write_text('{"pid": 1, "host": "another-host", "started": "earlier"}')
    # another machine's run: never taken over
    with pytest.raises(ResultsError, match="another-host"), run_lock(results):
        pass


def _damaged_run(results: Path) -> Path:
    _earlier_run(results)
    write_table(results, "trajectory", [{**ROW, "trial_id": "u"}], fragment="u")
    path = results / "trajectory" / "u.parquet"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # as a machine that lost power mid-copy would leave it
    return path


def test_a_damaged_fragment_is_named_by_report_and_moved_aside_by_resume(tmp_path: Path) -> None:
    """A generations fragment truncated to half its size passed silently: report and resume exited 0 and every
    Parquet reader then failed on the folder."""
    from capsafe.pipeline import _prepare_results_dir

    spec = Spec.model_validate({"experiment": "x", "output_dir": str(tmp_path)})
    bad = _damaged_run(spec.results_dir)
    (spec.results_dir / "trials").mkdir()
    assert [p for p, _ in damaged_fragments(spec.results_dir)] == [bad]
    proc = subprocess.run([sys.executable, "-m", "capsafe.cli", "report", str(spec.results_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and str(bad) in proc.stderr and "--resume" in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    import json

    (spec.results_dir / "spec.json").write_text(json.dumps(spec.model_dump(mode="json"), sort_keys=True, indent=1))
    lines: list[str] = []
    _prepare_results_dir(spec, resume=True, log=lines.append)
    assert not bad.exists() and damaged_fragments(spec.results_dir) == []
    kept = list((spec.results_dir / "damaged").rglob("u.parquet"))
    assert len(kept) == 1 and kept[0].stat().st_size > 0  # moved aside, never deleted
    assert "1 damaged fragment(s) moved to" in lines[0] and "trajectory/u.parquet" in lines[0]
    assert read_table(spec.results_dir, "trajectory").to_pylist() == [{**ROW, "run_id": None}]  # readable again


def test_move_aside_keeps_why(tmp_path: Path) -> None:
    bad = _damaged_run(tmp_path)
    target = move_aside(tmp_path, damaged_fragments(tmp_path))
    assert (target / "trajectory" / "u.parquet.why.txt").read_text().strip()
    assert not bad.exists()


def test_a_fragment_counts_as_written_once_it_and_its_folder_are_on_disk(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real = os.fsync

    def record(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(results_module.os, "fsync", record)
    path = write_table(tmp_path, "trajectory", [ROW], fragment="t")
    assert len(synced) == 2 and synced[0].startswith(str(path.parent / ".t.parquet."))  # the data, then
    assert synced[1] == str(path.parent)  # the folder that now names it


def test_a_ctrl_c_during_start_up_is_one_line_with_the_resume_command(tmp_path: Path, micro_world: object) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "capsafe.cli", "run", "tests/specs/micro.yaml",
                             f"output_dir={tmp_path}"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    deadline = time.time() + 120
    for line in proc.stdout:  # the first checks are done: the run is starting up
        if "context:" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("capsafe: interrupted.")
    assert "capsafe run --resume tests/specs/micro.yaml" in err and f"output_dir={tmp_path}" in err


def test_a_full_disk_is_one_line_with_the_resume_command(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The run on a 6 MB tmpfs ended in six tracebacks (Ray's WorkerGroupError around OSError 28)."""
    import errno

    from capsafe import cli

    assert cli.disk_full(OSError(errno.ENOSPC, "No space left on device", "/r/x.parquet")) is not None
    wrapped = RuntimeError("WorkerGroupError: ... OSError: [Errno 28] No space left on device")  # Ray passes text
    assert cli.disk_full(wrapped) is not None and cli.disk_full(ValueError("other")) is None

    def full(args: object) -> int:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "results/micro/trials/x.parquet")
        except OSError as exc:
            raise RuntimeError("the trial failed") from exc

    monkeypatch.setattr(cli, "_cmd_run", full)
    assert cli.main(["run", "tests/specs/micro.yaml", "seeds=[1]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disk is full" in err[0] and "results/micro/trials/x.parquet" in err[0]
    assert "capsafe run --resume tests/specs/micro.yaml 'seeds=[1]'" in err[0]


def test_a_sweep_stopped_early_names_its_missing_trials_and_the_resume_command(tmp_path: Path) -> None:
    # Ctrl-C mid-sweep: Ray Tune stops the trials and returns, the run writes a partial report and exits; its
    # last line now says what is missing and how to continue (it said nothing of --resume)
    from capsafe.pipeline import unfinished_note

    spec = Spec.model_validate({"output_dir": str(tmp_path), "experiment": "x", "seeds": [0, 1],
                                "methods": [{"name": "plain"}], "train": {"learning_rates": [0.001]}})
    base = {c: None for c in read_table(tmp_path / "none", "trials").schema.names}
    write_table(spec.results_dir, "trials", [{**base, "trial_id": "plain-s0-lr0.001"}], fragment="plain-s0-lr0.001")
    note = unfinished_note(spec, "jobs/x.yaml seeds=[0,1]")
    assert note is not None and "1 of 2 trial(s)" in note and "plain-s1-lr0.001" in note
    assert note.endswith("continue with: capsafe run --resume jobs/x.yaml seeds=[0,1]")
    write_table(spec.results_dir, "trials", [{**base, "trial_id": "plain-s1-lr0.001"}], fragment="plain-s1-lr0.001")
    assert unfinished_note(spec, "jobs/x.yaml") is None


def _answers(results: Path, trial: str, prompts: list[str], judge: str | None = None, repeats: int = 1,
             fragment: str | None = None) -> Path:
    """A generations (or, with ``judge``, judgments) fragment named and filled as capsafe writes it."""
    from capsafe.evaluate.fan_out import fragment_key

    key = [{"trial_id": trial, "step": 5, "suite": "harmful", "suite_kind": "harmful", "prompt_id": p, "repeat": r}
           for r in range(repeats) for p in prompts]
    if judge is None:
        rows = [{**k, "seed": k["repeat"], "prompt": "q", "response": "a", "response_ids": [1], "finish_reason": "stop",
                 "engine": "x", "generated_at": None} for k in key]
        name, table = fragment or fragment_key(trial, 5, "harmful"), "generations"
    else:
        rows = [{**k, "judge": judge, "measures": "refusal", "verdict": "refused", "score": None, "raw": None}
                for k in key]
        name, table = fragment or f"{fragment_key(trial, 5, 'harmful')}__{judge}", "judgments"
    return write_table(results, table, rows, fragment=name)


def test_a_fragment_whose_rows_are_not_its_keys_is_damaged_and_takes_its_judgments_aside(tmp_path: Path) -> None:
    """Issue 26: footers alone passed a fragment that a writer left short (a readable file, rows missing); the row
    count is now checked against the key: every prompt its suite's other fragments answered, once per repeat, and
    judgments exactly over the answers they judge."""
    prompts = ["p1", "p2", "p3"]
    whole = _answers(tmp_path, "plain-s0-lr0.001", prompts, repeats=2)
    _answers(tmp_path, "plain-s0-lr0.001", prompts, judge="refusal_keywords", repeats=2)
    short = _answers(tmp_path, "kl-s0-lr0.001", prompts[:2], repeats=2)  # p3 lost in both repeats
    its_judge = _answers(tmp_path, "kl-s0-lr0.001", prompts[:2], judge="refusal_keywords", repeats=2)
    unjudged = _answers(tmp_path, "base", prompts)
    thin = _answers(tmp_path, "base", prompts[1:], judge="refusal_keywords")  # labels 2 of 3 answers
    misnamed = _answers(tmp_path, "base", prompts, fragment="plain-s0-lr0.001__step5__harmful__r1")
    _answers(tmp_path, "hand", prompts[:1], fragment="all")  # hand-made: read as it is
    damaged = dict(damaged_fragments(tmp_path))
    assert set(damaged) == {short, thin, misnamed}, damaged
    assert "needs 3 prompt(s)" in damaged[short] and "2 are missing" in damaged[short]
    assert "labels 2 answer(s)" in damaged[thin] and "its rows are those of base__step5__harmful" in damaged[misnamed]
    with pytest.raises(ResultsError, match="3 damaged fragment"):
        from capsafe.common.run_guard import refuse_damaged

        refuse_damaged(tmp_path)
    target = move_aside(tmp_path, list(damaged.items()))
    assert not its_judge.exists() and (target / "judgments" / its_judge.name).is_file()  # judged again with them
    assert whole.exists() and unjudged.exists() and damaged_fragments(tmp_path) == []


def test_the_checked_fragment_names_are_the_ones_fan_out_writes() -> None:
    from capsafe.common.fragment_keys import generations_stem
    from capsafe.common.results import file_stem
    from capsafe.evaluate.fan_out import fragment_key

    for first in (0, 2):
        assert generations_stem("kl-s1-lr0.001", 40, "x@y", first) == file_stem(fragment_key("kl-s1-lr0.001", 40,
                                                                                              "x@y", first))
