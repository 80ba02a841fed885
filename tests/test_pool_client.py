"""The pool client's retries and the pool's Serve options, without a cluster."""

from __future__ import annotations

import pytest

from capsafe.common.generation import Sampling, Target
from capsafe.evaluate.pool_client import PoolClient, call_with_retries


class Died(Exception):
    pass


class FlakyHandle:
    """A Serve handle stand-in whose first ``failures`` calls die like a killed replica."""

    def __init__(self, failures: int) -> None:
        self.failures, self.calls, self.model = failures, [], None

    def options(self, multiplexed_model_id: str) -> FlakyHandle:
        self.model = multiplexed_model_id
        return self

    @property
    def generate(self) -> FlakyHandle:
        return self

    def remote(self, prompts: list[str], sampling: dict, adapter: str | None) -> FlakyHandle:
        self.calls.append((self.model, adapter, sampling["seed"]))
        self.pending = prompts
        return self

    def result(self) -> list[str]:
        if len(self.calls) <= self.failures:
            raise Died("replica died")
        return [p.upper() for p in self.pending]


def test_a_request_to_a_dead_replica_is_retried() -> None:
    logs: list[str] = []
    handle = FlakyHandle(failures=2)
    client = PoolClient(handle, retries=3, log=logs.append, retry_on=(Died,), backoff_s=0.0)
    out = client.generate(Target("m", "ad"), ["a", "b"], Sampling(4, seed=5)).result()
    assert out == ["A", "B"] and handle.calls == [("m", "ad", 5)] * 3 and client.retried == 2
    assert "retry 2/3" in logs[-1]
    client.close()


def test_retries_give_up_and_other_errors_are_not_retried() -> None:
    client = PoolClient(FlakyHandle(failures=5), retries=1, log=lambda m: None, retry_on=(Died,), backoff_s=0.0)
    with pytest.raises(Died):
        client.generate(Target("m"), ["a"], Sampling(4)).result()
    calls: list[int] = []

    def boom() -> None:
        calls.append(1)
        raise ValueError("a bug, not a dead replica")

    with pytest.raises(ValueError):
        call_with_retries(boom, 3, (Died,), lambda a, e: None, backoff_s=0.0)
    assert calls == [1]


def test_pool_options_fixed_or_autoscaling() -> None:
    from capsafe.evaluate.serve_pool import deployment_options

    assert deployment_options(2, 1.0, 0.0) == {"num_replicas": 2, "ray_actor_options": {"num_cpus": 1.0,
                                                                                          "num_gpus": 0.0}}
    auto = deployment_options(2, 4.0, 1.0, {"min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 2.0})
    assert "num_replicas" not in auto and auto["autoscaling_config"]["max_replicas"] == 8
