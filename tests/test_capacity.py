"""The capacity check's arithmetic, without Ray: cluster-launcher node types, a run's needs, the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from capsafe.errors import ClusterError
from capsafe.runtime.capacity import check_capacity, local_cpus, read_node_types, run_total, spec_needs
from capsafe.spec import load_spec

REPO = Path(__file__).resolve().parent.parent
MICRO = REPO / "tests" / "specs" / "micro.yaml"
AWS = read_node_types(REPO / "cluster" / "aws.yaml")


def _check(overrides: list[str], beside: bool = False) -> dict[str, float]:
    training, pool = spec_needs(load_spec(MICRO, overrides))
    return check_capacity(training, pool, AWS.max_resources(), AWS.shapes(), beside)


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_node_types_and_maximum(name: str) -> None:
    types = read_node_types(REPO / "cluster" / name)
    assert (types.head_type, types.head_resources, types.max_workers) == ("head", {"CPU": 8}, 8)
    assert types.worker_node_types == {"gpu_worker": {"resources": {"CPU": 96, "GPU": 8}, "node_config": {},
                                                      "min_workers": 0, "max_workers": 8}}
    assert types.max_resources() == {"CPU": 8 + 8 * 96, "GPU": 64}


def test_the_global_max_workers_caps_every_resource_apart(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_workers: 5\nhead_node_type: h\navailable_node_types:\n"
                   "  h: {resources: {CPU: 4}}\n"
                   "  gpu: {resources: {CPU: 8, GPU: 8}, min_workers: 0, max_workers: 4}\n"
                   "  cpu: {resources: {CPU: 64}, min_workers: 1, max_workers: 4}\n")
    # the richest type in each resource first, within 5 workers: 4 gpu + 1 cpu for GPUs, 4 cpu + 1 gpu for CPUs
    assert read_node_types(cfg).max_resources() == {"CPU": 4 + 4 * 64 + 8, "GPU": 32}
    cfg.write_text("head_node_type: h\navailable_node_types: {}\n")
    with pytest.raises(ClusterError, match="available_node_types"):
        read_node_types(cfg)


@pytest.mark.parametrize("path", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_job_fits_where_it_is_meant_to_run(path: Path) -> None:
    spec = load_spec(path)
    training, pool = spec_needs(spec)
    if spec.train.use_gpu:  # the GPU specs run on the launcher clusters
        for name in ("aws.yaml", "gcp.yaml"):
            types = read_node_types(REPO / "cluster" / name)
            check_capacity(training, pool, types.max_resources(), types.shapes(), False)
    else:  # the CPU specs on the embedded cluster, started with local_cpus logical CPUs and no GPU
        node = {"CPU": float(int(local_cpus(spec) + 0.999))}
        check_capacity(training, pool, node, {"local": node}, False)


def test_what_a_run_needs() -> None:
    training, pool = spec_needs(load_spec(MICRO, ["sweep.max_concurrent_trials=50", "train.use_gpu=true"]))
    # micro has 2 trials (2 methods x 1 seed x 1 rate): never more run at once, whatever the cap says
    assert [(n.bundle, n.count) for n in training] == [({"CPU": 0.5, "GPU": 1.0}, 4), ({"CPU": 0.1}, 2)]
    assert [(n.bundle, n.count) for n in pool] == [({"CPU": 1.0}, 1)]
    assert run_total(training, pool, False) == pytest.approx({"CPU": 2.2, "GPU": 4})  # the larger side
    assert run_total(training, pool, True) == pytest.approx({"CPU": 3.2, "GPU": 4})  # both sides add up
    _, pool = spec_needs(load_spec(MICRO, ["eval.autoscaling={min_replicas: 0, max_replicas: 100}"]))
    assert pool[0].count == 1  # an autoscaling pool must start one replica; more are a wish


def test_a_replica_or_worker_that_fits_no_node_is_refused() -> None:
    with pytest.raises(ClusterError, match=r"one pool replica needs CPU 1, GPU 16 on one node.*"
                                           r"gpu_worker: CPU 96, GPU 8.*eval.gpus_per_replica"):
        _check(["eval.gpus_per_replica=16"])
    with pytest.raises(ClusterError, match=r"CPU 128 on one node.*train.cpus_per_worker"):
        _check(["train.cpus_per_worker=128"])
    node = {"CPU": 2.0}
    training, pool = spec_needs(load_spec(MICRO, ["train.use_gpu=true"]))
    with pytest.raises(ClusterError, match=r"Ray Train workers ask for GPU, which no node of the cluster has.*"
                                           r"train.use_gpu=false"):
        check_capacity(training, pool, node, {"local": node}, False)


def test_a_run_beyond_the_cluster_maximum_is_refused_naming_what_to_lower() -> None:
    with pytest.raises(ClusterError, match=r"needs GPU 72 at once.*after training\), but the cluster gives at "
                                           r"most GPU 64; lower eval.replicas, eval.cpus_per_replica, "
                                           r"eval.gpus_per_replica; or let") as err:
        _check(["eval.replicas=9", "eval.gpus_per_replica=8"])
    assert "train." not in str(err.value)  # training alone fits: only the pool's fields are named
    gpu_sweep = ["train.use_gpu=true", "train.num_workers=8", "sweep.max_concurrent_trials=2", "eval.replicas=7",
                 "eval.gpus_per_replica=8"]
    assert _check(gpu_sweep)["GPU"] == 56  # after training: the larger of 16 and 56
    with pytest.raises(ClusterError, match=r"needs GPU 72 at once \(training: GPU 16; evaluation pool: GPU 56; the "
                                           r"pool runs beside training.*lower train.num_workers.*; or "
                                           r"eval.replicas.*; or let"):
        _check(gpu_sweep, beside=True)
    with pytest.raises(ClusterError, match="eval.autoscaling.min_replicas"):
        _check(["eval.autoscaling={min_replicas: 9, max_replicas: 9}", "eval.gpus_per_replica=8"])
    _check(["eval.autoscaling={min_replicas: 1, max_replicas: 100}", "eval.gpus_per_replica=8"])  # min fits
