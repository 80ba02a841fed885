"""One trial's fine-tuning loop on one rank, free of Ray: the host (Ray Train, or a test) supplies the rank,
a ``report`` function and, after a restart, the resume checkpoint to continue from.

Every ``eval_every`` steps (and when a budget runs out) all ranks run a batched greedy capability evaluation
on their shard of the held-out split. Each capability level crossed for the first time gets a model
checkpoint; the loop ends at the target (the ladder's last rung), on a spent budget, or on a non-finite loss.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsafe.capability import Budget, crossed_levels, stop_reason
from capsafe.data import Source, batches, read_jsonl
from capsafe.engines import greedy_generate
from capsafe.formatting import PromptFormat, collate, encode_example
from capsafe.metrics import score
from capsafe.train_model import TrainState, build_engine, load_resume_state, save_model_checkpoint, save_resume_state


@dataclass
class Host:
    """What the loop needs from whoever runs it."""

    rank: int
    world: int
    report: Callable[[dict[str, Any], Path | None], None]  # metrics, and this rank's resume files (or None)
    restore_dir: Path | None = None


def _capability(engine: Any, tokenizer: Any, cfg: dict[str, Any], fmt: PromptFormat, items: list[dict],
                host: Host) -> float:
    """Metric over the held-out items, computed shard-wise and summed over ranks."""
    import torch
    import torch.distributed as dist

    mine = items[host.rank::host.world]
    per_rank = math.ceil(len(items) / host.world)
    valid = len(mine)
    # Every rank must run the same number of forward passes under ZeRO-3 (parameters are gathered
    # collectively), so short shards are padded with a repeated item whose result is ignored.
    mine = mine + [items[0]] * (per_rank - valid)
    prompts = [fmt.render(it["prompt"], tokenizer) for it in mine]
    engine.module.eval()
    preds = greedy_generate(engine.module, tokenizer, prompts, cfg["eval_max_new_tokens"],
                            batch_size=cfg["eval_batch_size"], synced_gpus=host.world > 1)
    engine.module.train()
    total = score(cfg["metric"], preds[:valid], [it["answer"] for it in mine[:valid]]) * valid if valid else 0.0
    sums = torch.tensor([total, float(valid)], dtype=torch.float64)
    if host.world > 1:
        dist.all_reduce(sums)
    return float(sums[0] / sums[1])


def _sources(cfg: dict[str, Any]) -> list[Source]:
    task = [(r["prompt"], r["answer"]) for r in read_jsonl(cfg["task_train"], ("prompt", "answer"))]
    extras = [Source(s["name"], [(r["prompt"], r["response"]) for r in read_jsonl(s["path"], ("prompt", "response"))],
                     s["weight"]) for s in cfg["extra_sources"]]
    return [Source("task", task, 1.0 - sum(s.weight for s in extras)), *extras]


def run_training(cfg: dict[str, Any], host: Host) -> None:
    """Train one trial on this rank until it reaches its target, spends a budget, or diverges."""
    import torch
    import torch.distributed as dist

    torch.manual_seed(cfg["seed"])
    # One intra-op thread per reserved CPU: oversubscribed OpenMP threads spin and were ~10x slower here.
    torch.set_num_threads(cfg["torch_threads"])
    train = cfg["train"]
    engine, tokenizer, _holder = build_engine(cfg, host.world)
    state = load_resume_state(engine, host.restore_dir) if host.restore_dir else TrainState()
    fmt = PromptFormat(**cfg["prompt_format"])
    eval_items = read_jsonl(cfg["task_eval"], ("prompt", "answer"))[: cfg["eval_size"]]
    budget = Budget(train["max_steps"], train["max_tokens"], train["max_wall_s"])
    levels, target, accum = list(cfg["levels"]), cfg["target"], train["gradient_accumulation_steps"]
    encoded: dict[tuple[str, str], tuple[list[int], list[int]]] = {}

    def encode(prompt: str, response: str) -> tuple[list[int], list[int]]:
        if (prompt, response) not in encoded:
            encoded[(prompt, response)] = encode_example(tokenizer, fmt, prompt, response, train["max_seq_len"])
        return encoded[(prompt, response)]

    stream = batches(_sources(cfg), train["batch_size"], cfg["seed"])
    for _ in range(state.step):  # the same batches as an uninterrupted run
        next(stream)
    session_start = time.perf_counter() - state.elapsed_s
    losses: list[float] = []
    while True:
        tick = time.perf_counter()
        state.step += 1
        examples = [encode(p, r) for _, p, r in next(stream)]
        state.tokens += sum(len(ids) for ids, _ in examples)  # every rank sees the same global batch
        local = examples[host.rank::host.world]
        micro = len(local) // accum
        loss = 0.0
        for i in range(accum):
            batch = collate(local[i * micro:(i + 1) * micro], tokenizer.pad_token_id)
            out = engine(**{k: v.to(engine.device) for k, v in batch.items()})
            engine.backward(out.loss)
            engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
            loss += out.loss.item() / accum
        # One small collective per step keeps every decision identical on all ranks: the mean loss (a NaN on
        # any rank diverges them all) and rank 0's clock for the wall-time budget.
        shared = torch.tensor([loss, time.perf_counter() - session_start if host.rank == 0 else 0.0],
                              dtype=torch.float64)
        if host.world > 1:
            dist.all_reduce(shared)
        loss, state.elapsed_s = float(shared[0]) / host.world, float(shared[1])
        state.train_s += time.perf_counter() - tick
        losses.append(loss)
        base = {"step": state.step, "tokens": state.tokens, "elapsed_s": state.elapsed_s, "restarts": state.restarts}
        if not math.isfinite(loss):
            host.report({**base, "capability": float("nan"), "loss": loss, "stop": "diverged", "levels": "",
                         "model_dir": "", "train_s": state.train_s, "eval_s": state.eval_s}, None)
            return
        spent = budget.spent(state.step, state.tokens, state.elapsed_s)
        if state.step % train["eval_every"] and not spent:
            continue
        tick = time.perf_counter()
        capability = _capability(engine, tokenizer, cfg, fmt, eval_items, host)
        state.eval_s += time.perf_counter() - tick
        state.evals += 1
        new = crossed_levels(capability, levels, set(state.levels_done))
        reason = stop_reason(capability, target, spent)
        model_dir = ""
        if new:
            out = Path(cfg["checkpoint_dir"]) / f"step-{state.step}"
            save_model_checkpoint(engine, tokenizer, cfg, out, host.rank)
            model_dir = str(out)
            state.levels_done.extend(new)
        base["elapsed_s"] = time.perf_counter() - session_start  # rank 0's report is the one that counts
        metrics = {**base, "capability": capability, "loss": sum(losses) / len(losses), "stop": reason or "",
                   "levels": ",".join(f"{level:g}" for level in new), "model_dir": model_dir,
                   "train_s": state.train_s, "eval_s": state.eval_s}
        losses = []
        every = train["checkpoint_every_evals"]
        if reason or not every or state.evals % every:
            host.report(metrics, None)
        else:
            with tempfile.TemporaryDirectory(prefix="capsafe-resume-") as tmp:
                save_resume_state(engine, state, Path(tmp), host.rank)
                host.report(metrics, Path(tmp))
        if reason:
            return
