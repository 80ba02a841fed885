"""Issue 26 §6, object storage: results on s3:// through pyarrow against a local S3-compatible server (moto's server
mode, started and stopped here). The whole run on it is tests/test_e2e.py's submitted job; these are its parts."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3_server import environment, s3_server

from capsafe.common import storage
from capsafe.common.results import read_table, write_table
from capsafe.spec import Spec

REPO = Path(__file__).resolve().parent.parent
ROW = {"trial_id": "t", "step": 1, "capability": 0.5, "loss": 1.0, "tokens": 10, "elapsed_s": 2.0, "restarts": 0}


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    with s3_server() as env, environment(env):
        yield env


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CAPSAFE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _url(env: dict[str, str], name: str) -> str:
    return f"s3://{env['CAPSAFE_TEST_BUCKET']}/{name}"


def test_a_spec_on_object_storage_works_in_a_working_copy(cache: Path) -> None:
    spec = Spec.model_validate({"experiment": "x", "output_dir": "s3://bucket/runs"})
    assert spec.results_url == "s3://bucket/runs/x"
    assert spec.results_dir == cache / "object-store" / "s3" / "bucket" / "runs" / "x"
    assert Spec.model_validate({"output_dir": "gs://b/p"}).results_url == "gs://b/p/demo"
    assert storage.join("s3://b/p?endpoint_override=h:1", "x", "y.parquet") == "s3://b/p/x/y.parquet?endpoint_override=h:1"


def test_fragments_go_up_as_written_and_a_fresh_node_gets_them_back(s3_env: dict[str, str], cache: Path) -> None:
    url = _url(s3_env, "round-trip")
    local = storage.working_copy(url)
    storage.attach(local, url)
    write_table(local, "trajectory", [ROW], fragment="t")  # uploaded by write_table itself
    (local / "report.md").write_text("# report\n")
    (local / "models" / "t" / "step-1" / "model").mkdir(parents=True)
    (local / "models" / "t" / "step-1" / "model" / "w.bin").write_bytes(b"w" * 100)
    assert set(storage._listing(url)) == {"trajectory/t.parquet"}
    assert storage.push(local) == 1 and storage.push(local) == 0  # the report; then nothing changed
    assert set(storage._listing(url)) == {"trajectory/t.parquet", "report.md"}  # models/ are the trials' to upload
    storage.upload_tree(local / "models", storage.join(url, "models"))
    # another node: an empty cache
    import shutil

    shutil.rmtree(cache)
    pulled = storage.pull(url)
    assert pulled == local and read_table(pulled, "trajectory").to_pylist() == [{**ROW, "run_id": None}]
    assert not (pulled / "models").exists()  # checkpoints stay remote until something loads one
    model = storage.localize(storage.join(url, "models", "t", "step-1", "model"))
    assert Path(model, "w.bin").read_bytes() == b"w" * 100 and storage.localize("/a/local/path") == "/a/local/path"
    with pytest.raises(FileNotFoundError, match="nothing is stored there"):
        storage.localize(storage.join(url, "models", "missing"))
    storage.delete_all(url)
    assert not storage.holds_anything(url)


def test_trials_name_their_data_and_checkpoints_by_url(tmp_path: Path) -> None:
    from capsafe.train.config import SourceFile
    from capsafe.train.trials import on_object_storage, plan_trials, summarize_trial

    spec = Spec.model_validate({"experiment": "x", "output_dir": "s3://bucket/runs"})
    local = tmp_path / "copy"
    paths = {**{k: str(local / "data" / f"{k}.jsonl") for k in spec.data_paths()}, "model.path": "/models/base"}
    (trial,) = [t for t in plan_trials(spec, paths, local / "models") if t.method == "plain"]
    trial = trial.model_copy(update={"extra_sources": (SourceFile(name="g", path=str(local / "data" / "g.jsonl"),
                                                                  weight=0.1),)})
    (remote,) = on_object_storage([trial], local, "s3://bucket/runs/x")
    assert remote.task_train == "s3://bucket/runs/x/data/task.train_file.jsonl"
    assert remote.extra_sources[0].path == "s3://bucket/runs/x/data/g.jsonl" and remote.model_path == "/models/base"
    assert remote.checkpoint_url == f"s3://bucket/runs/x/models/{trial.trial_id}"
    report = {"step": 20, "capability": 0.08, "loss": 1.0, "tokens": 5, "elapsed_s": 1.0, "restarts": 0,
              "stop": "reached", "kept": '{"0": {"step": 20, "capability": 0.08, "tokens": 5, "elapsed_s": 1.0, '
              f'"model_dir": "{trial.checkpoint_dir}/step-20", "postprocess": ""}}}}', "train_s": 1.0, "eval_s": 0.1}
    row, checkpoints, _ = summarize_trial(remote.model_copy(update={"levels": (0.075,), "target": 0.075}), [report],
                                          None, 1.0)
    assert row["checkpoint"] == checkpoints[0]["checkpoint"] == f"{remote.checkpoint_url}/step-20"


def test_a_rerun_on_object_storage_is_refused_and_report_reads_the_bucket(s3_env: dict[str, str], cache: Path) -> None:
    """A run whose bucket prefix holds results is never replaced without --overwrite, even from a node whose working
    copy is empty; `capsafe report s3://...` pulls the run, writes the report and puts it beside the tables."""
    url = _url(s3_env, "runs")
    local = storage.working_copy(storage.join(url, "micro"))
    storage.attach(local, storage.join(url, "micro"))
    write_table(local, "trials", [{
        "trial_id": "base", "method": "base", "seed": 0, "learning_rate": 0.0, "target": 0.5, "tolerance": 0.05,
        "reached": False, "capability": 0.1, "confirmed_capability": 0.1, "step": 0, "status": "base",
        "stop_reason": "", "checkpoint": None, "tokens": 0, "wall_s": 0.0, "train_s": 0.0, "eval_s": 0.0,
        "restarts": 0, "method_params": "{}", "finished_at": None}], fragment="base")
    import shutil

    shutil.rmtree(local)  # another machine
    env = {**s3_env, "CAPSAFE_CACHE": str(cache)}
    import os

    proc = subprocess.run([sys.executable, "-m", "capsafe.cli", "run", "tests/specs/micro.yaml", f"output_dir={url}"],
                          cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"{url}/micro holds the results of an earlier run" in proc.stderr, proc.stderr
    assert "--overwrite" in proc.stderr and set(storage._listing(storage.join(url, "micro"))) == {"trials/base.parquet"}
    proc = subprocess.run([sys.executable, "-m", "capsafe.cli", "report", storage.join(url, "micro")], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"report.md", "report.html"} <= set(storage._listing(storage.join(url, "micro")))


def test_resume_reads_the_run_from_the_bucket(s3_env: dict[str, str], cache: Path) -> None:
    """`capsafe run --resume` on a node whose working copy is empty pulls the run first: here it finds the spec the
    run was made with, in the bucket, and refuses another one (it would say 'holds no earlier run' otherwise)."""
    import json
    import os

    from capsafe.spec import load_spec

    url = _url(s3_env, "resumed")
    spec = load_spec(REPO / "tests" / "specs" / "micro.yaml", [f"output_dir={url}"])
    local = spec.results_dir
    storage.attach(local, storage.join(url, "micro"))
    (local / "spec.json").write_text(json.dumps(spec.model_dump(mode="json"), sort_keys=True, indent=1))
    assert storage.push(local) == 1
    import shutil

    shutil.rmtree(cache)
    proc = subprocess.run([sys.executable, "-m", "capsafe.cli", "run", "--resume", "tests/specs/micro.yaml",
                           f"output_dir={url}", "seeds=[1]"], cwd=REPO, env={**os.environ, "CAPSAFE_CACHE": str(cache)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "the spec differs from the one" in proc.stderr, proc.stderr[-2000:]
    assert (local / "spec.json").is_file()  # pulled


def test_compare_reads_a_run_from_the_bucket_beside_a_local_one(s3_env: dict[str, str], cache: Path,
                                                                   tmp_path: Path) -> None:
    import os
    import shutil

    from test_compare import _run

    url = _url(s3_env, "cmp/lr-large")
    local = storage.working_copy(url)
    _run(tmp_path / "b" / "lr-large", "run-b", 0.003, plain_refusals=29)
    shutil.copytree(tmp_path / "b" / "lr-large", local)
    storage.attach(local, url)
    storage.push(local)
    shutil.rmtree(local)  # read from the bucket alone
    a = _run(tmp_path / "a" / "lr-small", "run-a", 0.001, plain_refusals=5)
    proc = subprocess.run([sys.executable, "-m", "capsafe.cli", "compare", str(a), url], cwd=REPO,
                          env={**os.environ, "CAPSAFE_CACHE": str(cache)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| run-b |" in proc.stdout and "| train.learning_rates | [0.001] | [0.003] |" in proc.stdout


def test_one_live_run_per_prefix_across_machines(s3_env: dict[str, str], cache: Path) -> None:
    """The run lock is an object in the bucket too: a run from another machine is refused (a local lock file would
    not see it), a dead run's lock on this host is recovered, and the run's own lock goes when it ends."""
    import json
    import os

    from capsafe.common.run_guard import LOCK_FILE, ResultsError, run_lock

    url = _url(s3_env, "locked/micro")
    lock = storage.join(url, LOCK_FILE)
    storage.write_text(lock, json.dumps({"pid": 1, "host": "another-host", "started": "earlier"}))
    with pytest.raises(ResultsError, match="another-host"), run_lock(storage.working_copy(url), url=url):
        pass
    assert "another-host" in str(storage.read_text(lock))  # never taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    storage.write_text(lock, json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename, "started": "x"}))
    lines: list[str] = []
    with run_lock(storage.working_copy(url), lines.append, url=url):
        assert f'"pid": {os.getpid()}' in str(storage.read_text(lock)) and "recovered the lock" in lines[0]
    assert storage.read_text(lock) is None
    # pulling a run never brings its lock into the working copy (a stale copy would block this machine for good)
    storage.write_text(lock, "{}")
    storage.write_text(storage.join(url, "spec.json"), "{}")
    assert not (storage.pull(url) / LOCK_FILE).exists()


def test_a_run_holding_its_lock_object_prepares_its_prefix(s3_env: dict[str, str], cache: Path) -> None:
    """The run's own lock object is not an earlier run's results (the submitted e2e job was refused for it), and
    --overwrite empties the prefix but for that lock."""
    from capsafe.common.run_guard import LOCK_FILE, run_lock
    from capsafe.pipeline import _prepare_results_dir

    spec = Spec.model_validate({"experiment": "x", "output_dir": _url(s3_env, "prepared")})
    url = str(spec.results_url)
    with run_lock(spec.results_dir, url=url):
        _prepare_results_dir(spec, resume=False)  # not refused
        assert storage.push(spec.results_dir) == 1 and set(storage._listing(url)) == {LOCK_FILE, "spec.json"}
    storage.write_text(storage.join(url, "trials", "base.parquet"), "x")
    with run_lock(spec.results_dir, url=url):
        _prepare_results_dir(spec, resume=False, overwrite=True, log=lambda m: None)
        assert set(storage._listing(url)) == {LOCK_FILE}  # the earlier run's objects deleted, the lock kept
    assert set(storage._listing(url)) == set()


def test_evaluate_reads_the_run_from_the_bucket(s3_env: dict[str, str], cache: Path) -> None:
    """`capsafe evaluate s3://...` takes the run's spec from the bucket (with an empty working copy) and checks the
    extension against it: a change to what was generated is refused as for a local run."""
    import json
    import os
    import shutil

    from capsafe.spec import load_spec

    url = _url(s3_env, "extended")
    spec = load_spec(REPO / "tests" / "specs" / "micro.yaml", [f"output_dir={url}"])
    storage.attach(spec.results_dir, str(spec.results_url))
    (spec.results_dir / "spec.json").write_text(json.dumps(spec.model_dump(mode="json"), sort_keys=True, indent=1))
    storage.push(spec.results_dir)
    shutil.rmtree(cache)
    proc = subprocess.run([sys.executable, "-m", "capsafe.cli", "evaluate", str(spec.results_url),
                           "eval.temperature=0.5"], cwd=REPO, env={**os.environ, "CAPSAFE_CACHE": str(cache)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "eval.temperature differs" in proc.stderr, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "capsafe.cli", "evaluate", storage.join(url, "nothing")], cwd=REPO,
                          env={**os.environ, "CAPSAFE_CACHE": str(cache)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "holds nothing" in proc.stderr, proc.stderr[-2000:]


def test_an_unreachable_store_is_one_line_and_nothing_is_written(cache: Path) -> None:
    """A wrong endpoint or missing credentials ended in pyarrow's traceback (exit 1)."""
    import os

    env = {**os.environ, "CAPSAFE_CACHE": str(cache), "AWS_ENDPOINT_URL": "http://127.0.0.1:1",
           "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1"}
    proc = subprocess.run([sys.executable, "-m", "capsafe.cli", "run", "tests/specs/micro.yaml",
                           "output_dir=s3://nobucket/x"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("capsafe: error: cannot reach s3://nobucket/x/micro"), \
        proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (cache / "object-store").exists()
