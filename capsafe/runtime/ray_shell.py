"""Joining or starting a Ray cluster, with the environment every capsafe process needs."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from capsafe.common.storage import cache_root
from capsafe.errors import ClusterError

__all__ = ["cache_root", "ray_logs_dir", "ray_session", "worker_env"]


def _env_key() -> str:
    return hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]


def worker_env() -> dict[str, str]:
    """Environment for every Ray worker (Train workers, Serve replicas)."""
    return {
        # Train V2 polls workers every 2 s by default, which makes each ray.train.report block ~1.6 s.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
        # DeepSpeed JIT-compiles a CPU comm op on first use; keep the build between runs. One folder per
        # Python environment: the build embeds its include paths, so two venvs sharing one would rebuild it
        # (~90 s) every time the other one had run.
        "TORCH_EXTENSIONS_DIR": str(cache_root() / "torch_extensions" / _env_key()),
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        "DS_BUILD_OPS": "0",
        # torch.distributed deprecation warnings from DeepSpeed's ZeRO-3 collectives flood the driver log.
        "PYTHONWARNINGS": "ignore::FutureWarning",
    }


@contextmanager
def ray_session(address: str | None, min_cpus: float) -> Iterator[None]:
    """Connect to ``address`` (or the job's cluster), or start an embedded local cluster; shut down only
    what this call started."""
    os.environ.update({k: v for k, v in worker_env().items() if k not in os.environ})
    import ray

    if ray.is_initialized():
        yield
        return
    env = {"env_vars": worker_env()}
    # Workers' output (Ray Train's "Reporting training result" per report and rank, vLLM's and Triton's start-up
    # warnings per engine) stays in Ray's log folder instead of burying capsafe's lines and Tune's table;
    # CAPSAFE_WORKER_LOGS=1 shows it on the console too.
    to_console = os.environ.get("CAPSAFE_WORKER_LOGS", "") not in ("", "0")
    try:
        if address is None and os.environ.get("RAY_ADDRESS"):
            # Inside a Ray job: the job's runtime env (set by `capsafe submit`) already carries worker_env();
            # passing another one makes Ray refuse to merge them.
            ray.init(log_to_driver=to_console)
        elif address:
            ray.init(address=address, runtime_env=env, log_to_driver=to_console)
        else:
            # Logical CPUs: trial drivers and the Serve controller hold small fractions beside the workers.
            cpus = max(float(os.cpu_count() or 1), min_cpus)
            # The dashboard (127.0.0.1 only) costs ~0.9 GB but without it Train V2 floods the log with
            # "State API may be temporarily unavailable" lines.
            # address="local": a new cluster even where `ray start` runs one on this machine (ray.init() with no
            # address would join it, and then refuse num_cpus)
            ray.init(address="local", num_cpus=int(cpus + 0.999), include_dashboard=True, dashboard_host="127.0.0.1",
                     runtime_env=env, log_to_driver=to_console)
    except ConnectionError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address!r} ({exc}); check ray_address in the spec "
                           "or unset it to use an embedded local cluster.") from None
    try:
        yield
    finally:
        try:
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()


def ray_logs_dir() -> str | None:
    """This Ray session's log folder on this node (where workers', Serve's and vLLM's output goes)."""
    try:
        from ray._private import worker  # no public API names the session's log folder

        node = worker._global_node
        return None if node is None else str(node.get_logs_dir_path())
    except Exception:  # noqa: BLE001 - only for a log line
        return None
