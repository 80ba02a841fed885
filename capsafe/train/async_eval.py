"""Asynchronous in-training capability evaluation (``train.async_eval``): training goes on while a snapshot of the
model is measured.

At an evaluation point every rank writes the snapshot (the model-checkpoint format, ``save_model_checkpoint``;
a collective under ZeRO-3) and rank 0 hands its path to a ``SnapshotEvaluator``: a process of its own that
loads the snapshot with transformers and answers the selection items greedily, exactly as the in-loop
evaluation does. The result comes back some steps later; the loop applies the stopping rule to the evaluated
step's record then, in step order, so the stop decision rests on a measured checkpoint and the kept checkpoint
is the one measured, never a later one. A separate process, not a thread: the trainer's process holds
DeepSpeed's ZeRO-3 context, under which transformers would partition any model it loads with collectives.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from typing import Any


def _serve(conn: Any, items: list[dict[str, Any]], prompts: list[list[int]], settings: dict[str, Any]) -> None:
    """The evaluator process: for each snapshot directory received, its capability on ``items``."""
    import torch
    from transformers import AutoModelForCausalLM

    from capsafe.common.formatting import load_tokenizer, stop_ids
    from capsafe.common.generation import greedy_generate
    from capsafe.common.metrics import score

    torch.set_num_threads(settings["threads"])
    while True:
        job = conn.recv()
        if job is None:
            return
        step, model_dir = job
        try:
            if settings["lora"]:
                from peft import PeftModel

                base = AutoModelForCausalLM.from_pretrained(settings["base_model"], dtype=torch.float32)
                model = PeftModel.from_pretrained(base, model_dir).eval()
            else:
                model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            tokenizer = load_tokenizer(model_dir)
            config = getattr(model, "generation_config", None)
            stop = stop_ids(tokenizer, getattr(config, "eos_token_id", None))
            preds = greedy_generate(model, tokenizer, prompts, settings["max_new_tokens"], stop,
                                    batch_size=settings["batch_size"])
            conn.send((step, score(settings["metric"], preds, [it["answer"] for it in items]), None))
        except Exception as exc:  # noqa: BLE001 - sent back and raised in the trainer
            conn.send((step, float("nan"), f"{type(exc).__name__}: {exc}"))


class SnapshotEvaluator:
    """Rank 0's evaluator process and the snapshots sent to it, oldest first."""

    def __init__(self, items: list[dict[str, Any]], prompts: list[list[int]], settings: dict[str, Any]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, items, prompts, settings), daemon=True)
        self.process.start()
        self.sent: deque[int] = deque()

    def submit(self, step: int, model_dir: str) -> None:
        self.sent.append(step)
        self.conn.send((step, model_dir))

    def poll(self, block: bool = False) -> tuple[int, float] | None:
        """The oldest snapshot's result once it is in (with ``block``, waits for it); None otherwise."""
        if not self.sent or not (block or self.conn.poll()):
            return None
        while not self.conn.poll(1.0):
            if not self.process.is_alive():
                raise RuntimeError(f"the capability evaluator process died (exit code {self.process.exitcode})")
        step, capability, error = self.conn.recv()
        expected = self.sent.popleft()
        if error or step != expected:
            raise RuntimeError(f"capability evaluation of step {step} failed: {error or 'out of order'}")
        return step, capability

    def close(self) -> None:
        if self.process.is_alive():
            self.conn.send(None)
            self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()

