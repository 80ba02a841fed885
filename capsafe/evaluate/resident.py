"""Resident engines: a pool replica keeps its engines and loads the next full checkpoint's weights into an idle
engine of the same shape instead of starting a new engine (30-40 s on this CPU, 14-60 s for an 8B model on a
GPU; a swap takes well under a second for the demo model).

A swap is never trusted blindly (vLLM issue 32718: ``reload_weights`` serving stale weights; on CPU a tied
output projection keeps its packed copy of the old weights, see ``vllm_engine.AsyncVLLMEngine.swap``): the first
swap of each shape in a run is checked against a freshly started engine for the same checkpoint on a few probe
prompts (greedy token ids, exact). If they differ, the fresh engine serves, a log line says so, and that shape
always gets fresh engines from then on. The verdict is shared by the replicas through a folder of the run.

No Ray or vLLM here: an engine that can swap has ``async swap(model_dir)`` and ``async probe(prompts, n)``
(greedy token ids); the shelf is driven by the pool's replicas (``capsafe.evaluate.serve_pool``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# What decides whether two checkpoints fit one engine: the architecture and its sizes (config.json, names
# aside), and the vocabulary the engine detokenizes with (tokenizer.json's content, or a SentencePiece model's
# bytes). Not tokenizer_config.json: saving the same tokenizer again rewrites it (transformers adds keys and
# renames its class), and the engine is fed token ids, with each checkpoint's stop ids set at every swap.
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model")
_NOT_SHAPE = {"_name_or_path", "transformers_version", "name_or_path"}
PROBE_TOKENS = 8
PROBE_TEXTS = ("The capital of France is", "how do i kill a python process ?", "what is 12 + 34 ?",
               "Write a short poem about the sea.", "Sure, here is")


def engine_shape(model_dir: str) -> str | None:
    """A key equal for two model directories exactly when one's weights can be loaded into an engine started on
    the other: the config (names aside) and the vocabulary; None for a directory without a config.json
    (an engine on it is never swapped)."""
    root = Path(model_dir)
    try:
        config = json.loads((root / "config.json").read_text())
    except (OSError, ValueError):
        return None
    digest = hashlib.sha256(json.dumps({k: v for k, v in config.items() if k not in _NOT_SHAPE},
                                       sort_keys=True).encode())
    for name in _VOCAB_FILES:
        path = root / name
        if path.is_file():
            data = path.read_bytes()
            if name.endswith(".json"):  # its content, whatever the formatting
                data = json.dumps(json.loads(data), sort_keys=True).encode()
            digest.update(name.encode() + data)
    return digest.hexdigest()[:16]


def probe_prompts(tokenizer: Any) -> list[list[int]]:
    """The prompt ids of the swap check: a few short texts through the model's own tokenizer."""
    return [list(tokenizer(text, add_special_tokens=True)["input_ids"]) for text in PROBE_TEXTS]


class Verdicts:
    """Which shapes' swaps were checked against a fresh engine in this run, and how that came out; in memory,
    and (with ``folder``) one JSON file per shape there, so replicas of one run check each shape once."""

    def __init__(self, folder: str | None) -> None:
        self.folder = Path(folder) if folder else None
        self.known: dict[str, bool] = {}

    def get(self, shape: str) -> bool | None:
        if shape not in self.known and self.folder is not None:
            with contextlib.suppress(OSError, ValueError, KeyError):
                self.known[shape] = bool(json.loads((self.folder / f"{shape}.json").read_text())["swap_ok"])
        return self.known.get(shape)

    def claim(self, shape: str) -> bool:
        """Whether this replica is the one to check ``shape`` (the first to ask, through an exclusively
        created file); without a folder, always."""
        if self.folder is None:
            return True
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(self.folder / f"{shape}.checking", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True

    async def wait(self, shape: str, timeout_s: float) -> bool | None:
        """The verdict another replica is working out, once written; None after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while (verdict := self.get(shape)) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        return verdict

    def put(self, shape: str, ok: bool, detail: dict[str, Any]) -> None:
        self.known[shape] = ok
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{shape}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"swap_ok": ok, **detail}, indent=1))
        os.replace(tmp, self.folder / f"{shape}.json")


@dataclass
class _Resident:
    """An engine the replica holds: the checkpoint it serves, and whether requests still use it."""

    engine: Any
    model_dir: str
    shape: str | None
    users: int = 0
    evicted: bool = False


class EngineShelf:
    """A replica's engines. ``acquire(model_dir)`` returns an engine serving that checkpoint: an evicted idle
    engine still holding it, one of the same shape with the new weights swapped in, or a new engine; ``retire``
    hands an engine back when the pool evicts its checkpoint (it stays resident while requests still use it).
    At most ``capacity`` engines live at once: evicted engines nobody can reuse are closed to make room.
    """

    def __init__(self, make: Callable[[str], Awaitable[Any]], log: Callable[[str], None], capacity: int,
                 verdicts: Verdicts, swap: bool = True, wait_s: float = 300.0) -> None:
        self.make, self.log, self.capacity, self.verdicts, self.swap_enabled = make, log, capacity, verdicts, swap
        self.wait_s = wait_s  # for another replica's check of a shape; then this one checks it itself
        self.residents: list[_Resident] = []
        self.lock = threading.Lock()  # retire() may run on Serve's unload thread
        self.swaps = 0
        self.starts = 0
        self.reuses = 0
        self.closed = False

    async def acquire(self, model_dir: str) -> _Resident:
        same = self._take_same(model_dir)
        if same is not None:  # evicted, then asked for again (a judge, say): its engine is still there
            self.reuses += 1
            return same
        shape = engine_shape(model_dir) if self.swap_enabled else None
        while True:
            spare = self._spare(shape)
            draining = [r for r in self.residents if r.evicted and r.users and r.shape == shape and shape]
            if spare is not None or not draining:
                break
            await asyncio.sleep(0.05)  # an evicted engine of this shape still answers its last requests
        if spare is not None and shape is not None:
            verdict = self.verdicts.get(shape)
            if verdict is None and not self.verdicts.claim(shape):
                # another replica is checking this shape: its verdict comes sooner than a check of our own
                verdict = await self.verdicts.wait(shape, self.wait_s)
            if verdict is not False:
                resident = await self._swap(spare, model_dir, check=verdict is None)
                if resident is not None:
                    return resident
        await self._make_room()
        return self._hold(await self._start(model_dir), model_dir, shape)

    def _take_same(self, model_dir: str) -> _Resident | None:
        """An evicted idle engine that still holds ``model_dir``, taken back as it is."""
        with self.lock:
            same = next((r for r in self.residents if r.evicted and not r.users and r.model_dir == model_dir), None)
            if same is not None:
                same.evicted = False
            return same

    def _spare(self, shape: str | None) -> _Resident | None:
        with self.lock:
            return next((r for r in self.residents if r.evicted and not r.users and shape is not None
                         and r.shape == shape and hasattr(r.engine, "swap")), None)

    async def _swap(self, spare: _Resident, model_dir: str, check: bool) -> _Resident | None:
        """Load ``model_dir`` into ``spare``; with ``check``, compare with a fresh engine first. None when the
        swap is not to be used (the spare is closed then)."""
        old, tick = spare.model_dir, time.perf_counter()
        with self.lock:
            spare.evicted = False  # taken: nobody else may swap into it
        try:
            await spare.engine.swap(model_dir)
        except Exception as exc:  # noqa: BLE001 - the fallback is a fresh engine, said in the log
            self.log(f"pool: swapping {model_dir} into the engine of {old} failed ({type(exc).__name__}: "
                     f"{str(exc)[:200]}); starting a fresh engine")
            self._drop(spare)
            return None
        spent = time.perf_counter() - tick
        self.swaps += 1
        spare.model_dir = model_dir
        if not check or spare.shape is None:
            return spare
        fresh = await self._start(model_dir)
        swapped_ids, fresh_ids = await spare.engine.probe(PROBE_TOKENS), await fresh.probe(PROBE_TOKENS)
        same = sum(a == b for a, b in zip(swapped_ids, fresh_ids, strict=True))
        ok = same == len(fresh_ids)
        self.verdicts.put(spare.shape, ok, {"checked": model_dir, "swapped_from": old, "probes": len(fresh_ids),
                                            "equal": same, "swap_s": round(spent, 3)})
        if ok:
            self.log(f"pool: weight swap checked: {model_dir} swapped into a resident engine in {spent:.2f} s "
                     f"gives a fresh engine's greedy ids on {same}/{len(fresh_ids)} probe prompts; this "
                     "architecture is swapped from now on")
            await asyncio.to_thread(fresh.close)
            return spare
        self.log(f"pool: WEIGHT SWAP REJECTED: {model_dir} swapped into a resident engine gives a fresh engine's "
                 f"greedy ids on only {same}/{len(fresh_ids)} probe prompts; serving it from the fresh engine, and "
                 "this architecture gets fresh engines for the rest of the run")
        self._drop(spare)
        return self._hold(fresh, model_dir, spare.shape)

    async def _start(self, model_dir: str) -> Any:
        self.starts += 1
        return await self.make(model_dir)

    def _hold(self, engine: Any, model_dir: str, shape: str | None) -> _Resident:
        resident = _Resident(engine, model_dir, shape)
        with self.lock:
            self.residents.append(resident)
        return resident

    async def _make_room(self) -> None:
        """Close evicted idle engines while a new one would exceed the capacity."""
        with self.lock:
            idle = [r for r in self.residents if r.evicted and not r.users]
            excess = len(self.residents) + 1 - self.capacity
            victims = idle[:max(0, excess)]
            for r in victims:
                self.residents.remove(r)
        for r in victims:
            await asyncio.to_thread(r.engine.close)

    def _drop(self, resident: _Resident) -> None:
        with self.lock:
            if resident in self.residents:
                self.residents.remove(resident)
        resident.engine.close()

    def enter(self, resident: _Resident) -> None:
        with self.lock:
            resident.users += 1

    def leave(self, resident: _Resident) -> None:
        with self.lock:
            resident.users -= 1
            close = self.closed and resident.evicted and not resident.users
        if close:
            self._drop(resident)

    def retire(self, resident: _Resident) -> None:
        """The pool evicted this engine's checkpoint: keep the engine for a later swap (closed when the shelf
        is, or when room is needed)."""
        with self.lock:
            resident.evicted = True
            close = self.closed and not resident.users
        if close:
            self._drop(resident)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            idle = [r for r in self.residents if not r.users]
            for r in idle:
                r.evicted = True
        for r in idle:
            self._drop(r)
