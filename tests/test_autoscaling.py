"""Autoscaled cloud runs, simulated on one machine: Ray's fake multi-node provider (what
``ray.cluster_utils.AutoscalingCluster`` starts) with cluster/aws.yaml's node types unchanged (8-GPU, 96-CPU
workers, 0 to 8 of them; the resources are logical). Capsafe's sweep (``run_sweep``: Tune, the trial recorder
and stopper) and its Serve pool deployment scale worker nodes out and back in, and a spec beyond the
cluster's maximum is refused before anything is written. Last, the embedded local cluster: the demo fits it,
GPUs it lacks are refused.

Stand-ins: each trial reserves what its Ray Train worker group would (a placement group of ``num_workers``
bundles of {CPU: cpus_per_worker, GPU: 1}, packed), holds it until every trial of the stage holds its own and
reports reaching its target; no model trains. The pool's replicas start with the spec's resources but no
request is sent, so no engine loads.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from capsafe.runtime.capacity import NodeTypes, read_node_types

REPO = Path(__file__).resolve().parent.parent
MICRO = REPO / "tests" / "specs" / "micro.yaml"
AWS = REPO / "cluster" / "aws.yaml"
pytestmark = pytest.mark.ray  # simulated clusters and an embedded one (conftest.py: one cluster at a time)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def simulated_cluster(types: NodeTypes, idle_timeout_s: float) -> Iterator[str]:
    """AutoscalingCluster's setup, started so that it touches nothing else on a shared machine (its start and
    shutdown run a machine-wide `ray stop --force`, and its base config is missing from the 2.60 wheel): its
    own temp dir, so Ray's 'current cluster' file does not redirect other ray.init() calls; free ports; no
    dashboard. Stopped by the process ids it started. Yields the GCS address."""
    tmp = Path(tempfile.mkdtemp(prefix="capsafe-sim-", dir="/tmp"))  # short: Ray's socket paths live in it
    port = _free_port()
    config = {
        "cluster_name": "capsafe-sim", "max_workers": types.max_workers, "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_s / 60, "head_node_type": "ray.head.default",
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{port}"},
        "available_node_types": {**types.worker_node_types, "ray.head.default": {
            "resources": types.head_resources, "node_config": {}, "max_workers": 0}},
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "rsync_exclude": [],
        "rsync_filter": [], "file_mounts_sync_continuously": False, "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": []}
    (tmp / "autoscaling.json").write_text(json.dumps(config))
    head = dict(types.head_resources)
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
           f"--num-cpus={head.pop('CPU', 0)}", f"--num-gpus={head.pop('GPU', 0)}", f"--resources={json.dumps(head)}",
           f"--temp-dir={tmp}", "--include-dashboard=false", f"--dashboard-port={_free_port()}",
           "--dashboard-agent-listen-port=0", f"--ray-client-server-port={_free_port()}", "--min-worker-port=0",
           "--max-worker-port=0", "--disable-usage-stats", f"--autoscaling-config={tmp / 'autoscaling.json'}"]
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           # the driver connects by address, which never turns token auth on: match whatever it runs with
           "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
           # on a busy 2-core machine a node's agents can take longer than the default 30 s to start
           "RAY_agent_register_timeout_ms": "120000"}
    log = tmp / "head.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        _stop_tree(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def _stop_tree(proc: subprocess.Popen) -> None:
    # `ray start --block` is the ancestor of every process of the simulated cluster (the autoscaler starts
    # worker nodes as its own children): take the tree before the head goes, then end each by its id.
    import psutil

    tree = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    for p in psutil.wait_procs(tree, timeout=5)[1]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


@pytest.fixture(scope="module")
def aws_sim() -> Iterator[tuple[str, NodeTypes]]:
    types = read_node_types(AWS)
    with simulated_cluster(types, idle_timeout_s=3) as address:
        yield address, types


def _wait_for_the_autoscalers_first_report() -> None:
    """The head says "Ray runtime started" before its autoscaler has published its first status (every
    AUTOSCALER_UPDATE_INTERVAL_S); until then the cluster reads as one that does not autoscale. On a busy machine
    (the suite's other xdist worker at work) the first status came after the test had looked."""
    from ray.experimental.internal_kv import _internal_kv_get

    _wait_for(lambda: bool(_internal_kv_get("__autoscaling_status")), 120,
              lambda: "the simulated cluster's autoscaler published no status within 120 s")


def _workers() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"] and "node:__internal_head__" not in n["Resources"])


def _wait_for(what: Callable[[], bool], timeout_s: float, message: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout_s
    while not what():
        assert time.monotonic() < deadline, message()
        time.sleep(0.5)


@pytest.mark.slow  # with the next test: ~40 s, the simulated cluster's start included
def test_a_spec_beyond_the_cluster_maximum_is_refused_before_anything_starts(aws_sim, tmp_path: Path) -> None:
    import ray
    from ray._private.state import state

    from capsafe.errors import ClusterError
    from capsafe.pipeline import run_experiment
    from capsafe.runtime.capacity import connected_cluster_limits, publish_node_types
    from capsafe.spec import load_spec

    address, types = aws_sim
    ray.init(address=address, log_to_driver=False)
    _wait_for_the_autoscalers_first_report()
    try:
        # Ray 2.60's autoscaler does not record its node types in the GCS: the cluster's maximum is unknown ...
        assert state.get_max_resources_from_cluster_config() is None
        limits = connected_cluster_limits()
        assert limits.autoscales and limits.max_resources is None
        # ... until capsafe publishes them, as the launcher configs in cluster/ do on the head
        publish_node_types(types)
        assert state.get_max_resources_from_cluster_config() == {"CPU": 776, "GPU": 64}
        limits = connected_cluster_limits()
        assert limits.autoscales and limits.max_resources == {"CPU": 776.0, "GPU": 64.0}
        assert limits.node_shapes["gpu_worker"] == {"CPU": 96.0, "GPU": 8.0}
    finally:
        ray.shutdown()
    base = [f"ray_address={address}", f"output_dir={tmp_path}"]
    for overrides, error in [
        (["eval.replicas=9", "eval.gpus_per_replica=8"], "needs GPU 72 at once.*at most GPU 64.*eval.replicas"),
        (["train.use_gpu=true", "train.num_workers=4", "train.cpus_per_worker=128"],
         "one Ray Train worker needs CPU 128, GPU 1 on one node.*gpu_worker: CPU 96, GPU 8"),
    ]:
        with pytest.raises(ClusterError, match=error):
            run_experiment(load_spec(MICRO, base + overrides), log=lambda m: None)
        assert not (tmp_path / "micro").exists()  # nothing written, not even the results folder


@pytest.mark.slow
def test_the_sweep_and_the_pool_scale_out_and_back_in(aws_sim, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from ray import serve

    import capsafe.train.sweep
    from capsafe.evaluate.serve_pool import build_pool, deployment_options, start_pool, stop_pool
    from capsafe.runtime.ray_shell import ray_session
    from capsafe.spec import load_spec
    from capsafe.train.trials import plan_trials

    address, _ = aws_sim
    # 2 trials at once, each 8 workers of 1 GPU; 2 replicas of 8 GPUs: two 8-GPU nodes for each stage
    spec = load_spec(MICRO, ["train.use_gpu=true", "train.num_workers=8", "sweep.max_concurrent_trials=2",
                             "eval.replicas=2", "eval.gpus_per_replica=8", f"ray_address={address}"])
    trials = plan_trials(spec, spec.data_paths(), tmp_path / "models")

    def stand_in_trial(config: dict[str, Any]) -> None:  # pickled by value: defined here, not importable
        import json
        import time
        from pathlib import Path

        import ray
        from ray import tune
        from ray.util.placement_group import placement_group, remove_placement_group

        res, cfg = config["resources"], config["trial"]
        bundle = {"CPU": res["cpus_per_worker"], **({"GPU": 1} if res["use_gpu"] else {})}
        group = placement_group([bundle] * res["num_workers"], strategy="PACK")  # ScalingConfig's default
        ray.get(group.ready(), timeout=180)
        # note the nodes the workers landed on, and hold them until every trial of the stage holds its own
        held = Path(res["held"])
        (held / cfg["trial_id"]).write_text(json.dumps(ray.util.placement_group_table(group)["bundles_to_node_id"]))
        deadline = time.monotonic() + 60
        while len(list(held.iterdir())) < res["at_once"] and time.monotonic() < deadline:
            time.sleep(0.2)
        remove_placement_group(group)
        tune.report({"step": 1, "capability": cfg["target"], "loss": 0.0, "tokens": 1, "elapsed_s": 2.0,
                     "train_s": 2.0, "eval_s": 0.0, "restarts": 0, "stop": "reached",
                     "levels": ",".join(str(i) for i in range(len(cfg["levels"]))), "model_dir": "stand-in",
                     "kept": json.dumps({str(i): {"step": 1, "capability": cfg["target"], "tokens": 1,
                                                  "elapsed_s": 2.0, "model_dir": "stand-in", "postprocess": ""}
                                         for i in range(len(cfg["levels"]))}),
                     "postprocess": ""})

    monkeypatch.setattr(capsafe.train.sweep, "_run_trial", stand_in_trial)
    rows: list[dict[str, Any]] = []
    e, t = spec.eval, spec.train
    resources = {"num_workers": t.num_workers, "use_gpu": t.use_gpu, "cpus_per_worker": t.cpus_per_worker,
                 "max_failures": 0, "at_once": spec.sweep.max_concurrent_trials,
                 "held": str(tmp_path / "held")}
    (tmp_path / "held").mkdir()
    with ray_session(spec.ray_address, 0):
        assert _workers() == 0  # min_workers 0: only the head
        capsafe.train.sweep.run_sweep(trials, resources, tmp_path / "ray", "sim", spec.sweep.max_concurrent_trials,
                                lambda m: None, lambda cfg, r, c, tr: rows.extend(r), tmp_path / "journal")
        assert sorted((r["trial_id"], r["status"]) for r in rows) == [
            ("plain-s0-lr0.003", "reached"), ("safety_mix-s0-lr0.003", "reached")]
        # out: the two trials held their workers at once, each on a whole 8-GPU node launched for it
        nodes = [set(json.loads(f.read_text()).values()) for f in (tmp_path / "held").iterdir()]
        assert len(nodes) == 2 and all(len(n) == 1 for n in nodes) and len(set.union(*nodes)) == 2, nodes
        serve.start(proxy_location="Disabled")  # Serve's controller (on the head) starts while the nodes drain
        _wait_for(lambda: _workers() == 0, 60, lambda: f"{_workers()} worker node(s) still up after the sweep")

        app = build_pool(e.engine, {}, deployment_options(e.replicas, e.cpus_per_replica, e.gpus_per_replica),
                         e.max_models_per_replica)
        start_pool(app, "capsafe-sim")  # returns once both replicas run, on nodes launched for them
        assert _workers() >= 2  # out again, from none
        stop_pool("capsafe-sim")
        serve.shutdown()
        _wait_for(lambda: _workers() == 0, 60, lambda: f"{_workers()} worker node(s) still up after the pool")


def test_the_embedded_cluster_fits_the_demo_and_refuses_gpus_it_lacks() -> None:
    from capsafe.errors import ClusterError
    from capsafe.runtime.capacity import check_cluster, connected_cluster_limits, local_cpus
    from capsafe.runtime.ray_shell import ray_session
    from capsafe.spec import load_spec

    demo = load_spec(REPO / "jobs" / "demo.yaml")
    with ray_session(None, local_cpus(demo)):  # the cluster run_experiment starts for the demo
        limits = connected_cluster_limits()
        assert not limits.autoscales and limits.max_resources and limits.max_resources["CPU"] >= local_cpus(demo)
        check_cluster(demo, log=lambda m: None)
        if not limits.max_resources.get("GPU"):
            with pytest.raises(ClusterError, match="Ray Train workers ask for GPU, which no node of the cluster "
                                                   r"has; to run on CPUs set train.use_gpu=false"):
                check_cluster(load_spec(MICRO, ["train.use_gpu=true"]), log=lambda m: None)
