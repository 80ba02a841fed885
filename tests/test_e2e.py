"""The real flow end to end on a micro spec: Ray Train + DeepSpeed (ZeRO-3, 2 workers), Ray Tune stopping at
the target, a Ray Serve pool of vLLM engines, Parquet results and the report. Minutes, not seconds."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from own_model_stand_ins import (
    MICRO_SIZE,
    OWN,
    OWN_SUITE_ITEMS,
    OWN_SUITES,
    gsm8k_from_world,
    long_context_copy,
    own_model_overrides,
)
from s3_server import environment, s3_server
from wandb_runs import logged_values

from capsafe.common import storage
from capsafe.common.results import read_table

REPO = Path(__file__).resolve().parent.parent
MICRO = "tests/specs/micro.yaml"
pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


def _check_results(out: Path, engine: str, methods: set[str], levels: tuple[float, ...] = (0.075,),
                   judges: int = 2, repeats: int = 1, harm_judges: int = 0,
                   suites: frozenset[str] = frozenset({"harmful", "harmful_styles", "overrefusal", "benign"}),
                   url: str | None = None) -> None:
    """``url``: the run's object-storage home, downloaded into ``out`` (its checkpoints are named by URL)."""
    trials = read_table(out, "trials").to_pandas()
    assert set(trials["method"]) == {"base"} | methods and trials["trial_id"].is_unique
    base = trials[trials["method"] == "base"].iloc[0]
    target, tolerance = float(base["target"]), float(base["tolerance"])
    assert base["status"] == "base" and base["capability"] < target - tolerance
    trajectory = read_table(out, "trajectory").to_pandas()
    checkpoints = read_table(out, "checkpoints").to_pandas()
    evaluated = {("base", 0)}
    for _, t in trials[trials["method"] != "base"].iterrows():
        traj = trajectory[trajectory["trial_id"] == t["trial_id"]].sort_values("step")
        ckpts = checkpoints[checkpoints["trial_id"] == t["trial_id"]].sort_values("level")
        assert not traj.empty and tuple(ckpts["level"]) == levels
        assert t["reached"] and t["stop_reason"] == "reached", t.to_dict()  # every trial reaches its target
        for _, c in ckpts[ckpts["reached"]].iterrows():
            # each rung keeps, among the evaluations up to the one that reached its level, the one inside its band
            # closest to the level (ties: the earlier; none inside: the one that reached it, outside the band),
            # and the served model scores what training said
            decided = traj[traj["capability"] >= c["level"] - 1e-12].iloc[0]
            upto = traj[traj["step"] <= decided["step"]]
            inside = upto[(upto["capability"] - c["level"]).abs() <= tolerance + 1e-12]
            best = inside.iloc[(inside["capability"] - c["level"]).abs().argsort(kind="stable")].iloc[0] \
                if not inside.empty else decided
            assert c["step"] == best["step"] and c["capability"] == pytest.approx(best["capability"])
            # the pool is fed the ids training was (tokenization contract): the served model scores the same
            assert c["served_capability"] == pytest.approx(c["capability"], abs=1e-9), c.to_dict()
            assert 0.0 <= c["confirmed_capability"] <= 1.0  # measured on the world's confirmation split
            model = (out / c["checkpoint"].removeprefix(f"{url}/") if url else Path(c["checkpoint"])) / "model"
            assert (model / "config.json").is_file() or (model / "adapter_config.json").is_file()
            evaluated.add((t["trial_id"], int(c["step"])))
        # the trial stopped at the first evaluation at or above the target itself; it keeps the target's rung
        assert traj["capability"].iloc[-1] >= target and (traj["capability"].iloc[:-1] < target).all()
        assert t["step"] == ckpts.iloc[-1]["step"]
        assert t["confirmed_capability"] == pytest.approx(ckpts.iloc[-1]["confirmed_capability"])
        assert t["tokens"] > 0 and t["train_s"] > 0 and t["eval_s"] > 0
    gens = read_table(out, "generations").to_pandas()
    judg = read_table(out, "judgments").to_pandas()
    assert set(zip(gens["trial_id"], gens["step"], strict=True)) == evaluated
    assert set(gens["engine"]) == {engine}
    assert set(gens["suite"]) == suites
    assert not gens.duplicated(["trial_id", "step", "suite", "prompt_id", "repeat"]).any()
    assert set(gens["repeat"]) == set(range(repeats))
    assert not judg.duplicated(["trial_id", "step", "suite", "prompt_id", "repeat", "judge"]).any()
    # rule judges label every response, harm classifiers (LLM judges) those of harmful suites only
    assert len(judg) == judges * len(gens) + harm_judges * int((gens["suite_kind"] == "harmful").sum())
    report = (out / "report.md").read_text()
    summary = report.split("\n## ", 1)[0]  # the per-method table comes before the first section
    assert summary.count("| base |") == 1 and "## Rates per suite and judge" in report
    assert (out / "report.html").is_file() and list((out / "plots").glob("*.png"))
    for name in ("trials", "checkpoints", "trajectory", "generations", "judgments"):
        pq.read_table(out / name)  # plain Parquet datasets, readable without capsafe
    manifest = json.loads((out / "manifest.json").read_text())  # what produced them (issue 26)
    assert manifest["run_id"] and manifest["packages"]["ray"] and manifest["models"]["model.path"]["sha256"]


def _tensorboard_scalars(folder: Path) -> dict[str, list[float]]:
    """Every scalar in the TensorBoard event files under ``folder``, read back with tensorboardX's protos (a
    TFRecord: length, its CRC, the Event bytes, their CRC)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[float]] = {}
    for path in folder.rglob("events.out.tfevents.*"):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append(value.simple_value)
    return scalars


def test_run_the_own_model_spec_at_micro_size_with_vllm(micro_world, micro_judge, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole flow on the "Run your own model" spec itself (docs/examples/own_model.yaml, issue 26 §2): the micro
    world's aligned tiny Llama (Llama 3's tokenizer convention) from a local folder as a hub id would be,
    GSM8K-layout parquet, the three benchmarks' CSV layouts, a Llama Guard format judge and a HarmBench classifier
    format judge, no field left to the demo world; Ray Train + DeepSpeed ZeRO-3 on 2 workers, Tune stopping at the
    target, a streaming Serve pool of vLLM engines, trackers, the report, then a judge added later."""
    train = gsm8k_from_world(micro_world.task_train, tmp_path / "gsm8k_train.parquet", 3000)
    test = gsm8k_from_world(micro_world.task_confirm, tmp_path / "gsm8k_test.parquet", 120)
    # one judge model for both formats (one engine): the world's Llama-Guard-format judge, with room for the
    # HarmBench classifier's ~1,200-token prompt. It answers in Llama Guard's words, so the HarmBench format's
    # parser finds no 'Yes' / 'No' in them: those verdicts must read 'unparsed', never 'safe'.
    judge = long_context_copy(micro_judge, tmp_path / "judge")
    mlruns = tmp_path / "mlruns"
    proc = subprocess.run([sys.executable, "-m", "capsafe.cli", "run", OWN,
                           *own_model_overrides(micro_world.model_dir, judge, judge, train, test, tmp_path),
                           *MICRO_SIZE,
                           # experiment tracking through Ray Tune's callbacks, offline: TensorBoard and MLflow
                           "sweep.tracking.tensorboard=true", f"sweep.tracking.mlflow_uri=file://{mlruns}",
                           "sweep.tracking.wandb_project=capsafe-test", "sweep.tracking.wandb_mode=offline"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = tmp_path / "own-model"
    _check_results(out, "vllm", {"plain", "kl"}, harm_judges=2, suites=frozenset(OWN_SUITES))
    gens = read_table(out, "generations").to_pandas()
    assert gens.groupby(["trial_id", "suite"]).size().to_dict() == {
        (t, s): n for t in set(gens["trial_id"]) for s, n in OWN_SUITE_ITEMS.items()}
    judg = read_table(out, "judgments").to_pandas()
    assert (judg[judg["judge"] == "llama_guard"]["verdict"] != "unparsed").mean() > 0.9
    assert (judg[judg["judge"] == "harmbench_cls"]["verdict"] == "unparsed").all()
    from capsafe.spec import DEMO, Spec

    manifest = json.loads((out / "manifest.json").read_text())
    assert DEMO not in Spec.model_validate(manifest["spec"]).data_paths().values()  # no demo default anywhere
    assert set(read_table(out, "trials").column("run_id").to_pylist()) == {manifest["run_id"]}  # every row's run
    assert "| plain |" in proc.stdout  # the report is printed at the end
    # streaming (eval.schedule's default): the pool started on the first trial's checkpoint while the second
    # trial was still training, and every key is there exactly once (_check_results)
    trials = read_table(out, "trials").to_pandas().set_index("trial_id")
    checkpoints = read_table(out, "checkpoints").to_pandas().set_index("trial_id")
    started = checkpoints.loc["plain-s0-lr0.003", "evaluation_started_at"]
    assert trials.loc["plain-s0-lr0.003", "finished_at"] < started < trials.loc["kl-s0-lr0.003", "finished_at"]
    assert "evaluated while training goes on" in proc.stdout
    # the pool's replica kept its engine and swapped the full checkpoints into it, checked once against a fresh
    # engine (issue 24): one line per checked shape, and no rejected swap
    swaps = [line for line in proc.stdout.splitlines() if "weight swap into a resident engine" in line]
    assert swaps and all("used for this shape" in line for line in swaps), proc.stdout[-3000:]
    # before anything trains, the run states the smallest Holm-adjusted p its plan can reach (issue 23)
    assert "smallest Holm-adjusted p reachable" in proc.stdout.split("] train ", 1)[0], proc.stdout[:3000]
    # workers' output stays in Ray's log folder: no per-report line from every rank, no vLLM start-up warnings
    console = proc.stdout + proc.stderr
    assert "Reporting training result" not in console and "EngineCore" not in console, console[-3000:]
    assert "vLLM's output: " in console
    # ... and last the summary table with one line per finding of the study, each with its number or why not
    closing = proc.stdout.split("capsafe summary", 1)[1]
    assert "| plain |" in closing and "Findings of this run:" in closing
    assert all(f"\n{n}. " in closing for n in (1, 2, 3)), closing
    assert "the sweep stopped before" not in closing  # every trial ended
    # Ray Tune's reporter printed its trial table (capsafe's trial id, status, step, capability, loss, tokens)
    row = r"\| TERMINATED +\|[^\n]*\| plain-s0-lr0\.003 +\| +\d+ \| +[\d.]+ \|"
    assert re.search(row, proc.stdout), proc.stdout[-3000:]
    # every trial's reports reached both trackers: TensorBoard event files and MLflow runs, read back
    scalars = _tensorboard_scalars(out / "ray" / "_tune")
    capability = [k for k in scalars if k.endswith("/capability")]
    assert capability and len(scalars[capability[0]]) >= 2, sorted(scalars)[:20]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow

    mlflow.set_tracking_uri(f"file://{mlruns}")
    runs = mlflow.search_runs(experiment_names=["own-model"])
    assert len(runs) == 2 and runs["metrics.capability"].notna().all(), runs.T.head(40)
    assert set(runs["params.trial/trial_id"]) == {"plain-s0-lr0.003", "kl-s0-lr0.003"}
    # ... and W&B's offline runs, one per trial, complete when the command returns: every capability a trial
    # reported is in its run file, read back from W&B's own records (the logging actor once was killed before
    # wandb-core had written them: tests/test_watching.py has the direct test)
    wandb_runs = sorted((out / "wandb").rglob("*.wandb"))
    assert len(wandb_runs) == 2, wandb_runs
    reported = read_table(out, "trajectory").to_pandas().groupby("trial_id").size()
    logged = sorted(len(logged_values(path, "capability")) for path in wandb_runs)
    assert logged == sorted(reported.tolist()), (logged, reported)
    _check_a_judge_added_later(out, judge)


def _check_a_judge_added_later(out: Path, judge: Path) -> None:
    """Issue 26: `capsafe evaluate` adds an LLM judge to the finished run; it judges the old generations through
    a pool, nothing is retrained or regenerated, and the snapshot and history record the addition."""
    keys = ["trial_id", "step", "suite", "prompt_id", "repeat"]
    before = read_table(out, "generations").to_pandas().sort_values(keys).reset_index(drop=True)
    trials = read_table(out, "trials").to_pandas()
    kept = [f"{{name: llama_guard, format: llama_guard, model: {judge}}}",
            f"{{name: harmbench_cls, format: harmbench, model: {judge}}}"]
    judges = "[" + ", ".join([*kept, f"{{name: guard2, format: llama_guard, model: {judge}, "
                                     "prompt_variants: [lg_terse]}"]) + "]"
    proc = subprocess.run([sys.executable, "-m", "capsafe.cli", "evaluate", str(out), f"eval.llm_judges={judges}"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = read_table(out, "generations").to_pandas().sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(before, after)  # reused as they were, generated_at included
    pd.testing.assert_frame_equal(trials, read_table(out, "trials").to_pandas())
    judg = read_table(out, "judgments").to_pandas()
    harmful = int((after["suite_kind"] == "harmful").sum())
    for name in ("guard2", "guard2@lg_terse"):
        added = judg[judg["judge"] == name]
        assert len(added) == harmful and added["raw"].notna().all(), name
    assert not judg.duplicated([*keys, "judge"]).any()
    assert [j["name"] for j in json.loads((out / "spec.json").read_text())["eval"]["llm_judges"]] == [
        "llama_guard", "harmbench_cls", "guard2"]
    (entry,) = [json.loads(line) for line in (out / "extensions.jsonl").read_text().splitlines()]
    assert entry["llm_judges"] == ["guard2"] and entry["overrides"] == [f"eval.llm_judges={judges}"]
    assert "| guard2 |" in (out / "report.md").read_text()


def _ray_pids(temp_dir: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if temp_dir in cmd:
                pids.append(int(entry.name))
    return pids


@contextlib.contextmanager
def _ray_head() -> Iterator[dict[str, str]]:
    """A real `ray start --head` on loopback ports, stopped by the PIDs of its own processes afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="csray-", dir="/tmp")  # short: Ray's socket paths are length-limited
    env = _env()
    start = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--port=6391", "--dashboard-port=8277",
         "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--num-cpus=3", f"--temp-dir={temp_dir}",
         "--include-dashboard=true", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180)
    try:
        assert start.returncode == 0, start.stderr[-3000:]
        env["RAY_AUTH_MODE"] = "token"
        env["CAPSAFE_TEST_RAY_TEMP_DIR"] = temp_dir
        yield env
    finally:
        for pid in _ray_pids(temp_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        # the head is disposable: 5 s for a clean exit, then SIGKILL (some of its processes never exited on
        # SIGTERM, and waiting 20 s for them cost every run of this module 20 s)
        deadline = time.time() + 5
        while time.time() < deadline and _ray_pids(temp_dir):
            time.sleep(0.5)
        for pid in _ray_pids(temp_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[dict[str, str]]:
    """One real head for the tests below (a start and a stop cost ~15 s): each runs its own experiment on it."""
    with _ray_head() as env:
        yield env


def test_submit_as_a_ray_job_to_a_real_head_with_lora(tmp_path: Path, ray_head: dict[str, str]) -> None:
    """The job writes its results to object storage (issue 26 §6: a local S3-compatible server, credentials passed
    to the job by name): checkpoints, tables, Ray's own state and the report go there, and the run is read back
    from the bucket alone."""
    with s3_server() as s3:
        _submit_with_lora(tmp_path, {**ray_head, **s3}, f"s3://{s3['CAPSAFE_TEST_BUCKET']}/runs")


def _submit_with_lora(tmp_path: Path, env: dict[str, str], output: str) -> None:
    # first the plan against this cluster (issue 26 §2): the run fits its 3 CPUs; 8 workers would not
    plan = [sys.executable, "-m", "capsafe.cli", "validate", MICRO, "--plan", "--address", "127.0.0.1:6391",
            f"output_dir={tmp_path}"]
    proc = subprocess.run(plan, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "the cluster (fixed, CPU 3) can hold it" in proc.stdout, \
        proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = subprocess.run([*plan, "train.num_workers=8"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "lower train.num_workers" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "micro").exists()
    proc = subprocess.run(
        [sys.executable, "-m", "capsafe.cli", "submit", MICRO, "--address", "http://127.0.0.1:8277",
         *(f"--env={name}" for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                        "AWS_ENDPOINT_URL")),
         f"output_dir={output}", "methods=[{name: plain}]",
         # the other half of the training matrix: LoRA adapters under ZeRO-2, served as vLLM LoRA requests
         # on the base engine; sampled twice per prompt; the whole judge panel (an LLM judge through the
         # pool, base-model perplexity in the coherence judge)
         "train.mode=lora", "train.zero_stage=2", "train.learning_rates=[0.01]",
         # LoRA learns the micro task slowly and noisily (0.00-0.15 over 1000 steps, rising from about step
         # 400): the budget leaves room for a machine whose kernels put the first pass into the band
         # (>= 0.05) after step 400, where CI once did; a trial stops as soon as it is reached
         "train.max_steps=1000",
         "eval.temperature=0.8", "eval.repeats=2", "eval.max_perplexity=5000",
         # the world's Llama-Guard-format judge model, its published prompt and a reworded one, each checked
         # on the world's held-out labelled conversations through the pool
         "eval.llm_judges=[{name: guard, prompt_variants: [lg_terse], check_file: demo}]"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert "SUCCEEDED" in proc.stdout and f"results: on object storage at {output}/micro" in proc.stdout
    # nothing of the run is needed from the driver's disk: its working copy goes, the report is rewritten from the
    # bucket by `capsafe report URL`, and the whole run (checkpoints included) is read back from the bucket
    url = f"{output}/micro"
    assert f"(results on object storage: {url};" in proc.stdout
    with environment(env):
        shutil.rmtree(storage.working_copy(url))
        listing = storage._listing(url)
        assert {"spec.json", "manifest.json", "report.md", "trials/base.parquet"} <= set(listing)
        assert any(k.startswith("ray/plain-s0-lr0.01/") for k in listing)  # Ray Train's own state, in the bucket
        assert not any(k.endswith(".tmp") or k.endswith(".part") for k in listing)
        proc = subprocess.run([sys.executable, "-m", "capsafe.cli", "report", url], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "| plain |" in proc.stdout, proc.stderr[-3000:]
        storage.download(url, tmp_path / "micro")
    _check_results(tmp_path / "micro", "vllm", {"plain"}, repeats=2, harm_judges=2, url=url)
    gens = read_table(tmp_path / "micro", "generations").to_pandas()
    assert set(gens["seed"]) == {0, 1}
    judg = read_table(tmp_path / "micro", "judgments").to_pandas()
    assert judg[judg["judge"] == "guard"]["raw"].notna().all()
    assert (judg[judg["judge"] == "guard"]["verdict"] != "unparsed").mean() > 0.9  # it answers in its format
    assert "## Judge prompt variants" in (tmp_path / "micro" / "report.md").read_text()
    assert judg[judg["judge"] == "coherence"]["score"].notna().any()
    # the judge checks: the held-out file through the pool for both prompts, and the run's own answers where the
    # world knows the truth; the report shows them
    checks = read_table(tmp_path / "micro", "judge_checks").to_pandas()
    assert set(map(tuple, checks[["judge", "check"]].drop_duplicates().to_numpy())) >= {
        ("guard", "check_file"), ("guard@lg_terse", "check_file"), ("guard", "run_answers")}
    held_out = checks[(checks["judge"] == "guard") & (checks["check"] == "check_file")]
    assert len(held_out) > 500 and set(held_out["type"]) == {"refusal", "harmful_compliance", "incoherent",
                                                              "benign_answer"}
    assert "## Judge checks" in (tmp_path / "micro" / "report.md").read_text()
    assert not list((tmp_path / "micro" / "models").rglob("merged"))  # adapters were served, not merged


def _train_worker_pids(temp_dir: str) -> list[int]:
    """Ray Train worker processes of this test's cluster (children of its raylet)."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if temp_dir in cmd and "raylet" in cmd:
            pids += [c.pid for c in proc.children(recursive=True)
                     if "RayTrainWorker" in " ".join(c.cmdline())]
    return pids


def _wait_for(what: str, check: Callable[[], bool], driver: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while not check():
        assert driver.poll() is None, f"driver exited while waiting for {what}:\n{log.read_text()[-4000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)


def _journal_steps(out: Path, trial: str) -> int:
    path = out / "journal" / f"{trial}.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_killed_worker_restarts_from_checkpoint_and_killed_driver_resumes(tmp_path: Path,
                                                                          ray_head: dict[str, str]) -> None:
    """Kills a Ray Train worker mid-trial (Ray Train restarts the group from the last resume checkpoint), then
    kills the driver mid-sweep; `capsafe run --resume` finishes the sweep without redoing or duplicating."""
    out = tmp_path / "faults"
    args = [sys.executable, "-m", "capsafe.cli", "run", MICRO, f"output_dir={tmp_path}", "experiment=faults",
            "ray_address=127.0.0.1:6391", "eval.engine=transformers", "train.zero_stage=2", "task.ladder=[0.025]"]
    first, second = "plain-s0-lr0.003", "safety_mix-s0-lr0.003"
    env = dict(ray_head)
    log = tmp_path / "driver.log"
    with log.open("w") as fh:
        driver = subprocess.Popen(args, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        _wait_for("the first resume checkpoint", lambda: _journal_steps(out, first) >= 1, driver, log, 600)
        workers = _train_worker_pids(env["CAPSAFE_TEST_RAY_TEMP_DIR"])
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        _wait_for("the first trial to finish", lambda: (out / "trials" / f"{first}.parquet").is_file(),
                  driver, log, 900)
        _wait_for("the second trial's first report", lambda: _journal_steps(out, second) >= 1, driver, log, 600)
        driver.kill()  # the driver dies mid-sweep, without any chance to clean up
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert not (out / "trials" / f"{second}.parquet").exists()
    resumed = subprocess.run([*args[:4], "--resume", *args[4:]], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=1200)
    assert resumed.returncode == 0, resumed.stdout[-5000:] + resumed.stderr[-3000:]
    assert "1 already done" in resumed.stdout
    _check_results(out, "transformers", {"plain", "safety_mix"}, levels=(0.025, 0.075))
    # the killed driver's lock was recovered, and the manifest says the run was resumed (issue 26)
    assert "recovered the lock of run pid" in resumed.stdout and not (out / ".capsafe.lock").exists()
    assert [h["event"] for h in json.loads((out / "manifest.json").read_text())["history"]] == ["resume"]
    trials = read_table(out, "trials").to_pandas().set_index("trial_id")
    assert trials.loc[first, "restarts"] >= 1 and trials.loc[first, "reached"]  # survived the killed worker
    assert trials.loc[second, "restarts"] >= 1  # continued from its checkpoint, not from step 0
    trajectory = read_table(out, "trajectory").to_pandas()
    steps = trajectory[trajectory["trial_id"] == second]["step"]
    assert steps.min() == 20  # the steps trained before the driver died are kept
