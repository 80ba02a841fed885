"""Resident engines (``capsafe.evaluate.resident``) with stand-in engines: a checkpoint of a shape already served
is swapped into an evicted idle engine, the first swap of each shape is checked against a fresh engine and a
failed check falls back to fresh engines with a log line, engines still answering are waited for, and LoRA
adapters get names unique to each checkpoint. The same swap on real vLLM engines: tests/test_engines.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

import pytest

from capsafe.evaluate.resident import EngineShelf, Verdicts, engine_shape
from capsafe.evaluate.vllm_engine import adapter_name


class FakeEngine:
    """Greedy ids are a function of the weights it holds; ``stale`` makes a swap keep the old ones."""

    def __init__(self, model_dir: str, stale: bool = False, fail: bool = False) -> None:
        self.model_dir, self.weights, self.stale, self.fail, self.closed = model_dir, model_dir, stale, fail, False

    async def swap(self, model_dir: str) -> None:
        if self.fail:
            raise RuntimeError("no room")
        self.model_dir = model_dir
        if not self.stale:
            self.weights = model_dir

    async def probe(self, max_tokens: int) -> list[list[int]]:
        # a deterministic id per (weights, prompt): hash() of a string changes with every process's hash seed and,
        # taken modulo 1000, made two checkpoints agree on a probe now and then (a flaky '1/3' for '0/3')
        return [[int(hashlib.sha256(f"{self.weights}:{i}".encode()).hexdigest()[:12], 16)] * max_tokens
                for i in range(3)]

    def close(self) -> None:
        self.closed = True


def _model(root: Path, name: str, width: int = 64) -> str:
    path = root / name
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"hidden_size": width, "_name_or_path": name}))
    (path / "tokenizer.json").write_text("{}")
    return str(path)


class Replica:
    """A shelf as a pool replica drives it, with the engines it started and its log."""

    def __init__(self, folder: Path | None, capacity: int = 2, **engine: bool) -> None:
        self.started: list[FakeEngine] = []
        self.log: list[str] = []

        async def make(model_dir: str) -> FakeEngine:
            await asyncio.sleep(0.05)  # an engine start takes a while: other replicas go on meanwhile
            self.started.append(FakeEngine(model_dir, **engine))
            return self.started[-1]

        self.shelf = EngineShelf(make, self.log.append, capacity, Verdicts(str(folder) if folder else None))

    def serve(self, model_dir: str):  # noqa: ANN201 - a _Resident
        return asyncio.run(self.shelf.acquire(model_dir))


def test_a_checkpoint_of_a_served_shape_is_swapped_in_and_the_first_swap_is_checked(tmp_path: Path) -> None:
    a, b, c = (_model(tmp_path, n) for n in "abc")
    replica = Replica(tmp_path / "checks")
    first = replica.serve(a)
    replica.shelf.retire(first)
    second = replica.serve(b)  # swapped into a's engine, checked against a fresh engine started for b
    assert second.engine is first.engine and second.engine.weights == b
    assert len(replica.started) == 2 and replica.started[1].closed  # the check's fresh engine is gone again
    assert "weight swap checked" in replica.log[-1] and "3/3" in replica.log[-1]
    replica.shelf.retire(second)
    third = replica.serve(c)  # this shape is checked: swapped without another fresh engine
    assert third.engine is first.engine and third.engine.weights == c and len(replica.started) == 2
    assert (replica.shelf.swaps, replica.shelf.starts) == (2, 2)
    assert json.loads(next((tmp_path / "checks").glob("*.json")).read_text())["swap_ok"] is True


def test_a_swap_that_differs_from_a_fresh_engine_is_rejected_with_a_log_line(tmp_path: Path) -> None:
    a, b, c = (_model(tmp_path, n) for n in "abc")
    replica = Replica(tmp_path / "checks", stale=True)
    first = replica.serve(a)
    replica.shelf.retire(first)
    second = replica.serve(b)
    assert second.engine is replica.started[1] and second.engine.weights == b  # the fresh engine serves
    assert first.engine.closed and "WEIGHT SWAP REJECTED" in replica.log[-1] and "0/3" in replica.log[-1]
    replica.shelf.retire(second)
    third = replica.serve(c)  # the shape is marked: fresh engines from now on, no swap
    assert third.engine is replica.started[2] and third.engine.weights == c and replica.shelf.swaps == 1
    # another replica of the run reads the verdict and never swaps this shape either
    other = Replica(tmp_path / "checks", stale=True)
    other.shelf.retire(other.serve(a))
    assert other.serve(b).engine is other.started[1] and other.shelf.swaps == 0


def test_a_failing_swap_falls_back_to_a_fresh_engine(tmp_path: Path) -> None:
    a, b = _model(tmp_path, "a"), _model(tmp_path, "b")
    replica = Replica(None, fail=True)
    replica.shelf.retire(replica.serve(a))
    served = replica.serve(b)
    assert served.engine is replica.started[1] and replica.started[0].closed
    assert "failed (RuntimeError: no room); starting a fresh engine" in replica.log[-1]


def test_other_shapes_get_their_own_engines_within_the_capacity(tmp_path: Path) -> None:
    a, wide = _model(tmp_path, "a"), _model(tmp_path, "wide", width=128)
    replica = Replica(None, capacity=1)
    first = replica.serve(a)
    replica.shelf.retire(first)
    other = replica.serve(wide)  # no engine of its shape: a new one, and the evicted one closed for room
    assert other.engine is replica.started[1] and first.engine.closed and replica.shelf.swaps == 0
    assert len(replica.shelf.residents) == 1


def test_an_evicted_engine_still_answering_is_waited_for_then_swapped(tmp_path: Path) -> None:
    a, b = _model(tmp_path, "a"), _model(tmp_path, "b")
    replica = Replica(tmp_path / "checks")

    async def scenario() -> tuple[object, bool]:
        first = await replica.shelf.acquire(a)
        replica.shelf.enter(first)  # a request of a's is still generating
        replica.shelf.retire(first)
        pending = asyncio.create_task(replica.shelf.acquire(b))
        await asyncio.sleep(0.2)
        waited = not pending.done()
        replica.shelf.leave(first)
        return (await pending).engine is first.engine, waited

    swapped, waited = asyncio.run(scenario())
    assert swapped and waited


def test_closing_the_shelf_closes_idle_engines_now_and_busy_ones_when_done(tmp_path: Path) -> None:
    replica = Replica(None)
    idle, busy = replica.serve(_model(tmp_path, "a")), replica.serve(_model(tmp_path, "b"))
    replica.shelf.enter(busy)
    replica.shelf.close()
    assert idle.engine.closed and not busy.engine.closed
    replica.shelf.retire(busy)
    replica.shelf.leave(busy)
    assert busy.engine.closed


def test_engine_shape_ignores_names_and_sees_sizes_and_tokenizers(tmp_path: Path) -> None:
    a, b, wide = _model(tmp_path, "a"), _model(tmp_path, "b"), _model(tmp_path, "wide", width=128)
    assert engine_shape(a) == engine_shape(b) != engine_shape(wide)
    (Path(b) / "tokenizer.json").write_text('{"added": 1}')
    assert engine_shape(a) != engine_shape(b)
    assert engine_shape(str(tmp_path / "missing")) is None


def test_lora_adapter_names_are_unique_per_checkpoint(tmp_path: Path) -> None:
    one, two = tmp_path / "trial" / "step-10" / "model", tmp_path / "trial" / "step-20" / "model"
    for path in (one, two):
        path.mkdir(parents=True)
        (path / "adapter_model.safetensors").write_bytes(b"weights")
    assert adapter_name(str(one)) != adapter_name(str(two))
    assert adapter_name(str(one)) == adapter_name(str(one))
    before = adapter_name(str(one))
    weights = one / "adapter_model.safetensors"
    weights.write_bytes(b"other weights")  # a checkpoint rewritten in place is a new adapter to vLLM
    os.utime(weights, ns=(1, 1))
    assert adapter_name(str(one)) != before


@pytest.mark.parametrize("folder", [True, False])
def test_verdicts_are_shared_through_the_run_folder(tmp_path: Path, folder: bool) -> None:
    first = Verdicts(str(tmp_path) if folder else None)
    first.put("shape", True, {"checked": "b"})
    assert Verdicts(str(tmp_path) if folder else None).get("shape") is (True if folder else None)


def test_one_replica_checks_a_shape_while_another_waits_for_its_verdict(tmp_path: Path) -> None:
    a, b, c = (_model(tmp_path, n) for n in "abc")
    checks = tmp_path / "checks"
    first, second = Replica(checks), Replica(checks)

    async def scenario() -> None:
        for replica, model in ((first, a), (second, a)):
            replica.shelf.retire(await replica.shelf.acquire(model))
        await asyncio.gather(first.shelf.acquire(b), second.shelf.acquire(c))

    asyncio.run(scenario())
    # one of them started a fresh engine to check the swap; the other swapped on its verdict without one
    assert sorted(len(r.started) for r in (first, second)) == [1, 2]
    assert first.shelf.swaps == second.shelf.swaps == 1


def test_a_replica_checks_itself_when_the_other_never_answers(tmp_path: Path) -> None:
    a, b = _model(tmp_path, "a"), _model(tmp_path, "b")
    checks = tmp_path / "checks"
    Verdicts(str(checks)).claim(engine_shape(a) or "")  # a replica that claimed the check and died
    replica = Replica(checks)
    replica.shelf.wait_s = 0.3
    replica.shelf.retire(replica.serve(a))
    replica.serve(b)
    assert len(replica.started) == 2 and "weight swap checked" in replica.log[-1]


def test_an_evicted_engine_asked_for_again_is_reused_as_it_is(tmp_path: Path) -> None:
    judge, a = _model(tmp_path, "judge", width=32), _model(tmp_path, "a")
    replica = Replica(None, capacity=3)
    first = replica.serve(judge)
    replica.shelf.retire(first)  # Serve's LRU evicted the judge for a checkpoint
    replica.serve(a)
    again = replica.serve(judge)
    assert again is first and len(replica.started) == 2 and replica.shelf.reuses == 1
