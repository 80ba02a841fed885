"""Will the run fit the cluster? What a spec asks Ray for, the most a cluster can give, and the check between.

The pure part reads a Ray cluster-launcher YAML's node types and checks a run's needs against a maximum. The
Ray part (ray imported inside functions) reads the connected cluster's maximum from the GCS, where Ray keeps
the autoscaler's node types (``ClusterConfig``). Ray 2.60's autoscaler does not report them there itself, so
``python -m capsafe.runtime.capacity publish <cluster yaml>`` does (the launcher configs in cluster/ run it on the
head); Ray Train's own worker-group check reads the same record.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from capsafe.errors import CapsafeError, ClusterError

if TYPE_CHECKING:
    from capsafe.spec import Spec

Resources = dict[str, float]
TRIAL_DRIVER_CPUS = 0.1  # each Tune trial's own process (tune.with_resources in capsafe.train.sweep)
CHECKED = ("CPU", "GPU")  # memory is left to Ray: its logical amounts say little about what a model needs


@dataclass(frozen=True)
class NodeTypes:
    """A cluster-launcher config's node types, in the form ``ray.cluster_utils.AutoscalingCluster`` takes."""

    head_type: str
    head_resources: Resources
    worker_node_types: dict[str, dict[str, Any]]  # name -> resources, node_config {}, min_workers, max_workers
    max_workers: int  # the config's top-level cap on worker nodes of all types together

    def shapes(self) -> dict[str, Resources]:
        """Every node type that can exist, by name, with its resources."""
        workers = {n: dict(t["resources"]) for n, t in self.worker_node_types.items() if t["max_workers"] > 0}
        return {self.head_type: dict(self.head_resources), **workers}

    def max_resources(self) -> Resources:
        """The most of each resource the cluster can hold: the head plus, resource by resource, the worker
        types richest in it up to their own max_workers, all within the global max_workers."""
        keys = set(self.head_resources).union(*(t["resources"] for t in self.worker_node_types.values()))
        most: Resources = {}
        for key in sorted(keys):
            total, left = float(self.head_resources.get(key, 0)), self.max_workers
            for t in sorted(self.worker_node_types.values(), key=lambda t: -t["resources"].get(key, 0)):
                take = min(t["max_workers"], left)
                total, left = total + take * t["resources"].get(key, 0), left - take
            most[key] = total
        return most


def read_node_types(path: str | Path) -> NodeTypes:
    """The node types of a Ray cluster-launcher YAML (``available_node_types``, ``head_node_type``,
    ``max_workers``), e.g. cluster/aws.yaml."""
    try:
        cfg = yaml.safe_load(Path(path).expanduser().read_text())
        types, head = cfg["available_node_types"], cfg["head_node_type"]
        head_resources = dict(types[head].get("resources") or {})
        cap = cfg.get("max_workers")
        workers: dict[str, dict[str, Any]] = {name: {"resources": dict(t.get("resources") or {}), "node_config": {},
                          "min_workers": int(t.get("min_workers", 0)),
                          "max_workers": int(t.get("max_workers", cap if cap is not None else 0))}
                   for name, t in types.items() if name != head}
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ClusterError(f"cannot read node types from {path} ({type(exc).__name__}: {exc}); pass a Ray "
                           "cluster-launcher config with available_node_types (each with resources, min_workers, "
                           "max_workers) and head_node_type, like cluster/aws.yaml.") from None
    total = int(cap) if cap is not None else sum(t["max_workers"] for t in workers.values())
    return NodeTypes(head, head_resources, workers, total)


@dataclass(frozen=True)
class Need:
    """``count`` bundles of ``bundle``, all held at once, each on a single node."""

    unit: str  # what one bundle is: "Ray Train worker", "pool replica"
    bundle: Resources
    count: int
    size_fields: str  # the spec fields that set one bundle, and those that set the count: what to lower
    count_fields: str


def spec_needs(spec: Spec) -> tuple[list[Need], list[Need]]:
    """(training, evaluation pool): what the sweep holds at its busiest, and what the pool must hold to serve.
    An autoscaling pool needs its min_replicas (at least one) to start; more replicas are a wish, not a need."""
    t, e = spec.train, spec.eval
    trials = min(spec.sweep.max_concurrent_trials, len(spec.methods) * len(spec.seeds) * len(t.learning_rates))
    worker = {"CPU": t.cpus_per_worker, **({"GPU": 1.0} if t.use_gpu else {})}
    training = [Need("Ray Train worker", worker, trials * t.num_workers, "train.cpus_per_worker, train.use_gpu",
                     "train.num_workers, sweep.max_concurrent_trials"),
                Need("trial driver", {"CPU": TRIAL_DRIVER_CPUS}, trials, "", "sweep.max_concurrent_trials")]
    replicas = max(1, e.autoscaling.min_replicas) if e.autoscaling else e.replicas
    replica = {"CPU": e.cpus_per_replica, **({"GPU": e.gpus_per_replica} if e.gpus_per_replica else {})}
    count = "eval.autoscaling.min_replicas" if e.autoscaling else "eval.replicas"
    pool = [Need("pool replica", replica, replicas, "eval.cpus_per_replica, eval.gpus_per_replica", count)]
    return training, pool


def _total(needs: list[Need]) -> Resources:
    total: Resources = {}
    for n in needs:
        for k, v in n.bundle.items():
            total[k] = total.get(k, 0.0) + v * n.count
    return total


def _fmt(res: Resources, keys: tuple[str, ...] = CHECKED) -> str:
    return ", ".join(f"{k} {res.get(k, 0):g}" for k in keys if k in res) or "nothing"


def run_total(training: list[Need], pool: list[Need], pool_beside_training: bool) -> Resources:
    """What the run holds at its busiest: training plus pool when the pool runs beside training, else the
    larger of the two, resource by resource."""
    a, b = _total(training), _total(pool)
    pick = (lambda x, y: x + y) if pool_beside_training else max
    return {k: pick(a.get(k, 0.0), b.get(k, 0.0)) for k in set(a) | set(b)}


def check_capacity(training: list[Need], pool: list[Need], max_resources: Resources,
                   node_shapes: dict[str, Resources], pool_beside_training: bool,
                   source: str = "the cluster") -> Resources:
    """Raise ClusterError when a worker or replica fits no node, or the run's busiest moment exceeds the
    cluster's maximum; else return that busiest moment. ``source`` names the cluster in messages."""
    for need in [*training, *pool]:
        keys = tuple(k for k in CHECKED if need.bundle.get(k, 0) > 0)
        absent = [k for k in keys if not any(s.get(k, 0) > 0 for s in node_shapes.values())]
        if absent:
            raise ClusterError(f"the {need.unit}s ask for {', '.join(absent)}, which no node of {source} has; to run "
                               "on CPUs set train.use_gpu=false and eval.gpus_per_replica=0, or connect to a cluster "
                               f"that has {', '.join(absent)} (ray_address).")
        if not any(all(need.bundle[k] <= s.get(k, 0) + 1e-9 for k in keys) for s in node_shapes.values()):
            largest = "; ".join(f"{name}: {_fmt(s, keys)}" for name, s in node_shapes.items())
            raise ClusterError(f"one {need.unit} needs {_fmt(need.bundle, keys)} on one node, more than any node "
                               f"of {source} has ({largest}); lower {need.size_fields}, or add a larger node type.")
    total = run_total(training, pool, pool_beside_training)
    short = [k for k in CHECKED if total.get(k, 0) > max_resources.get(k, 0) + 1e-9]
    if not short:
        return total
    sides = {"training": training, "evaluation pool": pool}
    parts = "; ".join(f"{side}: {_fmt({k: _total(needs).get(k, 0) for k in short}, tuple(short))}"
                      for side, needs in sides.items())
    # beside training every need adds to the peak; after it, only a side that alone exceeds the maximum counts
    over = [needs for needs in sides.values()
            if pool_beside_training or any(_total(needs).get(k, 0) > max_resources.get(k, 0) + 1e-9 for k in short)]
    culprits = [f"{n.count_fields}, {n.size_fields}".strip(", ") for needs in over for n in needs
                if any(n.bundle.get(k, 0) > 0 for k in short)]
    when = "the pool runs beside training, so both add up" if pool_beside_training else "the pool runs after training"
    raise ClusterError(f"the run needs {_fmt(total, tuple(short))} at once ({parts}; {when}), but {source} gives at "
                       f"most {_fmt({k: max_resources.get(k, 0) for k in short}, tuple(short))}; lower "
                       f"{'; or '.join(dict.fromkeys(culprits))}; or let the cluster grow larger "
                       "(max_workers in its config).")


def peak_text(spec: Spec, pool_beside_training: bool) -> str:
    """What the run holds at its busiest, in words (``capsafe validate --plan`` without a cluster)."""
    return _fmt(run_total(*spec_needs(spec), pool_beside_training))


def local_cpus(spec: Spec, pool_beside_training: bool = False) -> float:
    """Logical CPUs an embedded local cluster is started with, at least: the run's busiest moment plus room
    for Tune's and Serve's own small actors."""
    return run_total(*spec_needs(spec), pool_beside_training).get("CPU", 0.0) + 0.5


@dataclass(frozen=True)
class ClusterLimits:
    max_resources: Resources | None  # None: the cluster autoscales but its node types were not published
    node_shapes: dict[str, Resources]
    autoscales: bool
    source: str  # where the numbers come from, for messages


def connected_cluster_limits() -> ClusterLimits:
    """The connected cluster's maximum: the autoscaler's node types recorded in the GCS when present;
    otherwise, for a cluster that does not autoscale, what its nodes hold now."""
    import ray
    from ray._private.state import state  # Ray's reader of the GCS ClusterConfig (what Ray Train checks)

    config = state.get_cluster_config()
    if config is not None and config.node_group_configs:
        most = state.get_max_resources_from_cluster_config() or {}
        shapes = {g.name: {k: float(v) for k, v in g.resources.items()}
                  for g in config.node_group_configs if g.max_count != 0}
        scales = any(g.max_count != g.min_count for g in config.node_group_configs)
        return ClusterLimits({k: float(v) for k, v in most.items()}, shapes, scales, "the cluster (at its largest)")
    if _autoscaled_types():
        return ClusterLimits(None, {}, True, "an autoscaling cluster")
    nodes = [n for n in ray.nodes() if n["Alive"]]
    return ClusterLimits(dict(ray.cluster_resources()), {f"node {n['NodeManagerAddress']}#{i}": n["Resources"]
                                                         for i, n in enumerate(nodes)}, False, "the cluster")


def _autoscaled_types() -> set[str]:
    # The autoscaler's status names the node types it manages; a cluster started without an autoscaling
    # config gets Ray's read-only provider, whose types are 'node_<id>' (format_readonly_node_type).
    from ray.experimental.internal_kv import _internal_kv_get

    status = _internal_kv_get("__autoscaling_status")
    if not status:
        return set()
    report = json.loads(status).get("autoscaler_report") or {}
    return {t for t in (report.get("node_type_mapping") or {}).values() if not t.startswith("node_")}


def check_cluster(spec: Spec, log: Callable[[str], None], pool_beside_training: bool = False) -> None:
    """Refuse (ClusterError) a spec the connected cluster can never hold, before anything is written."""
    limits = connected_cluster_limits()
    if limits.max_resources is None:
        log("capacity: the cluster autoscales but has not published its node types, so the run is not checked "
            "against its maximum (python -m capsafe.runtime.capacity publish <cluster yaml> on its head does it)")
        return
    training, pool = spec_needs(spec)
    total = check_capacity(training, pool, limits.max_resources, limits.node_shapes, pool_beside_training,
                           limits.source)
    kind = "autoscaling, at most" if limits.autoscales else "fixed,"
    log(f"capacity: the run holds at most {_fmt(total)} at once; the cluster ({kind} "
        f"{_fmt(limits.max_resources)}) can hold it")


def publish_node_types(types: NodeTypes) -> None:
    """Record ``types`` in the connected cluster's GCS as the autoscaler's ClusterConfig (integer amounts:
    the record holds whole units)."""
    import ray
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()  # type: ignore[attr-defined]  # generated protobuf module
    head = config.node_group_configs.add(name=types.head_type, min_count=1, max_count=1)
    head.resources.update({k: int(v) for k, v in types.head_resources.items()})
    for name, t in types.worker_node_types.items():
        group = config.node_group_configs.add(name=name, min_count=t["min_workers"], max_count=t["max_workers"])
        group.resources.update({k: int(v) for k, v in t["resources"].items()})
    config.max_resources.update({k: int(v) for k, v in types.max_resources().items()})
    worker: Any = ray._private.worker.global_worker  # no public API writes the record
    worker.gcs_client.report_cluster_config(config.SerializeToString())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m capsafe.runtime.capacity", description="Publish a Ray "
                                     "cluster-launcher config's node types to the running cluster, where "
                                     "capsafe's capacity check and Ray Train read its maximum.")
    parser.add_argument("command", choices=["publish"])
    parser.add_argument("config", help="the cluster-launcher YAML, e.g. ~/ray_bootstrap_config.yaml on the head")
    parser.add_argument("--address", default="auto", help="the cluster's GCS address (default: the local one)")
    args = parser.parse_args(argv)
    try:
        types = read_node_types(args.config)
        import ray

        ray.init(address=args.address, log_to_driver=False)
        try:
            publish_node_types(types)
        finally:
            ray.shutdown()
    except CapsafeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ConnectionError as exc:
        print(f"error: no Ray cluster at {args.address!r} ({exc}); run this on the head after `ray start --head`, "
              "or pass --address HOST:PORT.", file=sys.stderr)
        return 2
    print(f"published {len(types.worker_node_types)} worker type(s): at most {_fmt(types.max_resources())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
