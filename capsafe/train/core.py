"""One trial's fine-tuning loop on one rank, free of Ray: the host (Ray Train, or a test) supplies the rank,
a ``report`` function and, after a restart, the resume checkpoint to continue from.

Every ``eval_every`` steps (and when a budget runs out) all ranks run a batched greedy capability evaluation
on their shard of the held-out split. An evaluation inside a level's band is a candidate for it and gets a model
checkpoint (at most ``train.keep_candidates`` per level stay on disk); a level is decided when capability
reaches it, keeping its candidate closest to it (``capsafe.common.capability.advance``). The loop ends at the
target (the ladder's last rung), on a spent budget, or on a non-finite loss.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsafe.common.capability import Budget, advance, eval_interval, new_rungs
from capsafe.common.data import Source, batches, read_jsonl
from capsafe.common.formatting import Encoder, collate, stop_ids
from capsafe.common.generation import greedy_generate
from capsafe.common.metrics import score
from capsafe.common.storage import to_url, upload_tree
from capsafe.mitigations import MethodSpec, method_from_json
from capsafe.mitigations.losses import proximal
from capsafe.train.config import SourceFile, TrialConfig
from capsafe.train.model import (
    TrainState,
    build_engine,
    build_reference,
    load_resume_state,
    save_model_checkpoint,
    save_resume_state,
)


@dataclass
class Host:
    """What the loop needs from whoever runs it."""

    rank: int
    world: int
    report: Callable[[dict[str, Any], Path | None], None]  # metrics, and this rank's resume files (or None)
    restore_dir: Path | None = None
    # (step, seconds, tokens) after every optimizer step: the GPU check times steady-state steps with it, since
    # the reports' cumulative figures cannot leave out the steps right after an evaluation or a save
    on_step: Callable[[int, float, int], None] | None = None


def _capability(engine: Any, encoder: Encoder, cfg: TrialConfig, items: list[dict], host: Host) -> float:
    """The trial's capability metric over the held-out items, computed shard-wise and summed over ranks."""
    return capability_on(engine, encoder, items, host, cfg.eval_max_new_tokens, cfg.eval_batch_size, cfg.metric)


def capability_on(engine: Any, encoder: Encoder, items: list[dict], host: Host, max_new_tokens: int,
                  batch_size: int, metric: str) -> float:
    """``metric`` over ``items`` from greedy answers of at most ``max_new_tokens``, sharded over the ranks."""
    import torch
    import torch.distributed as dist

    mine = items[host.rank::host.world]
    per_rank = math.ceil(len(items) / host.world)
    valid = len(mine)
    # Every rank must run the same number of forward passes under ZeRO-3 (parameters are gathered
    # collectively), so short shards are padded with a repeated item whose result is ignored.
    mine = mine + [items[0]] * (per_rank - valid)
    prompts = [encoder.prompt(it["prompt"]) for it in mine]
    engine.module.eval()
    config = getattr(engine.module, "generation_config", None)
    stop = stop_ids(encoder.tokenizer, getattr(config, "eos_token_id", None))
    preds = greedy_generate(engine.module, encoder.tokenizer, prompts, max_new_tokens, stop,
                            batch_size=batch_size, synced_gpus=host.world > 1)
    engine.module.train()
    total = score(metric, preds[:valid], [it["answer"] for it in mine[:valid]]) * valid if valid else 0.0
    sums = torch.tensor([total, float(valid)], dtype=torch.float64)
    if host.world > 1:
        dist.all_reduce(sums)
    return float(sums[0] / sums[1])


def _read_sources(entries: tuple[SourceFile, ...]) -> list[Source]:
    return [Source(s.name, [(r["prompt"], r["response"]) for r in read_jsonl(s.path, ("prompt", "response"))],
                   s.weight) for s in entries]


def _sources(cfg: TrialConfig) -> list[Source]:
    task = [(r["prompt"], r["answer"]) for r in read_jsonl(cfg.task_train, ("prompt", "answer"))]
    extras = _read_sources(cfg.extra_sources)
    return [Source("task", task, 1.0 - sum(s.weight for s in extras)), *extras]


class _Batches:
    """The trial's batch streams: task batches (task data and its mixes) and, for methods that alternate,
    alignment batches; step ``s`` draws from the stream its method's phase names, so a resumed trial replays
    exactly the batches an uninterrupted one saw."""

    def __init__(self, cfg: TrialConfig, method: MethodSpec) -> None:
        size, seed = cfg.train.batch_size, cfg.seed
        self.method = method
        self.streams = {"task": batches(_sources(cfg), size, seed)}
        if cfg.alignment_sources:
            self.streams["alignment"] = batches(_read_sources(cfg.alignment_sources), size, seed + 1)

    def next(self, step: int) -> list[tuple[str, str, str]]:
        return next(self.streams[self.method.phase(step)])


def _postprocess(method: MethodSpec, cfg: TrialConfig) -> Callable[[Path], dict[str, Any] | None] | None:
    if type(method).postprocess is MethodSpec.postprocess:
        return None
    return lambda model_dir: method.postprocess(model_dir, cfg.model_path, cfg.method_paths)


def run_training(cfg: TrialConfig, host: Host) -> None:
    """Train one trial on this rank until it reaches its target, spends a budget, or diverges."""
    import torch

    torch.manual_seed(cfg.seed)
    # One intra-op thread per reserved CPU: oversubscribed OpenMP threads spin and were ~10x slower here.
    torch.set_num_threads(cfg.torch_threads)
    train = cfg.train
    method = method_from_json(cfg.method, cfg.method_params)
    engine, tokenizer, _holder = build_engine(cfg, host.world)
    reference = build_reference(engine, cfg, host.world) if method.needs_reference else None
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    view = method.evaluation_view(engine.module, cfg.model_path, cfg.method_paths)
    state = load_resume_state(engine, host.restore_dir) if host.restore_dir else TrainState()
    encoder = Encoder(tokenizer, cfg.prompt_format)
    eval_items = read_jsonl(cfg.task_eval, ("prompt", "answer"))[: cfg.eval_size]
    budget = Budget(train.max_steps, train.max_tokens, train.max_wall_s)
    levels, tolerance = list(cfg.levels), cfg.tolerance
    encoded: dict[tuple[str, str], tuple[list[int], list[int]]] = {}

    def encode(prompt: str, response: str) -> tuple[list[int], list[int]]:
        if (prompt, response) not in encoded:
            encoded[(prompt, response)] = encoder.example(prompt, response, train.max_seq_len)
        return encoded[(prompt, response)]

    if not state.rungs:
        state.rungs = new_rungs(levels)
    # Models of candidates the ladder let go, deleted once a resume checkpoint no longer holds them: a restart
    # from an earlier resume checkpoint still counts them as candidates.
    unheld: list[int] = []
    stream = _Batches(cfg, method)
    for step in range(1, state.step + 1):  # the same batches as an uninterrupted run
        stream.next(step)
    session_start = time.perf_counter() - state.elapsed_s
    losses: list[float] = []
    evaluator = _evaluator(cfg, encoder, eval_items) if train.async_eval and host.rank == 0 else None
    for record in state.pending if evaluator else []:  # snapshots a restart found unmeasured
        evaluator.submit(record["step"], str(Path(record["model_dir"]) / "model"))  # type: ignore[union-attr]

    def decide(record: dict[str, Any], spent: str | None, saved: bool) -> str | None:
        """The stopping rule on one measured evaluation ``record``: save or drop its model, report, and return
        why the trial stops (None: go on). ``saved``: its model is on disk already (an async snapshot)."""
        nonlocal unheld
        state.evals += 1
        state.last_capability = record["capability"]
        ladder = advance(state.rungs, record, tolerance, train.keep_candidates, spent)
        if ladder.save and not saved:  # the record is in ladder.rungs: its postprocess note lands there too
            record["postprocess"] = save_model_checkpoint(engine, tokenizer, cfg, Path(record["model_dir"]),
                                                          host.rank, _postprocess(method, cfg))
        elif saved and not ladder.save:
            unheld.append(record["step"])  # a snapshot the ladder does not hold
        state.rungs, reason = ladder.rungs, ladder.stop
        unheld += ladder.dropped
        kept = {str(i): state.rungs[i]["kept"] for i in ladder.decided}
        metrics = {"step": record["step"], "tokens": record["tokens"], "elapsed_s": record["elapsed_s"],
                   "restarts": state.restarts, "capability": record["capability"],
                   "loss": sum(losses) / len(losses) if losses else float("nan"), "stop": reason or "",
                   # indices into cfg.levels, not formatted numbers: 0.8333333 must not come back as 0.833333
                   "candidate": ",".join(map(str, ladder.candidate_for)),
                   "levels": ",".join(map(str, ladder.decided)), "kept": json.dumps(kept) if kept else "",
                   "model_dir": record["model_dir"] if ladder.save else "", "postprocess": record["postprocess"],
                   "train_s": state.train_s, "eval_s": state.eval_s}
        losses.clear()
        if host.rank == 0 and cfg.checkpoint_url:
            # object storage: a level's kept checkpoint goes up as the level is decided, before the report that
            # says so (a restart on another node would not find it on this one's disk), so the trial's rows and the
            # pool, on any node, find it there
            for i in ladder.decided:
                local = Path(state.rungs[i]["kept"]["model_dir"])
                if not local.is_dir():
                    raise FileNotFoundError(f"kept checkpoint {local} is not on this node's disk")
                upload_tree(local, to_url(str(local), Path(cfg.checkpoint_dir), cfg.checkpoint_url))
        every = train.checkpoint_every_evals
        if reason or not every or state.evals % every:
            host.report(metrics, None)
        else:
            with tempfile.TemporaryDirectory(prefix="capsafe-resume-") as tmp:
                save_resume_state(engine, state, Path(tmp), host.rank)
                host.report(metrics, Path(tmp))
        if reason or not every or state.evals % every == 0:  # no resume checkpoint holds them any more
            if host.rank == 0:
                for step in unheld:
                    shutil.rmtree(Path(cfg.checkpoint_dir) / f"step-{step}", ignore_errors=True)
            unheld = []
        if reason and host.rank == 0:  # snapshots taken after the deciding one are never measured
            for late in state.pending:
                shutil.rmtree(Path(late["model_dir"]), ignore_errors=True)
        return reason

    try:
        _train(cfg, host, state, engine, tokenizer, stream, encode, method, view, trainable, reference, encoder,
               eval_items, budget, evaluator, decide, session_start, losses)
    finally:
        if evaluator is not None:
            evaluator.close()


def _evaluator(cfg: TrialConfig, encoder: Encoder, items: list[dict]) -> Any:
    from capsafe.train.async_eval import SnapshotEvaluator

    return SnapshotEvaluator(items, [encoder.prompt(it["prompt"]) for it in items], {
        "threads": cfg.torch_threads, "lora": cfg.train.mode == "lora", "base_model": cfg.model_path,
        "max_new_tokens": cfg.eval_max_new_tokens, "batch_size": cfg.eval_batch_size, "metric": cfg.metric})


def _train(cfg: TrialConfig, host: Host, state: TrainState, engine: Any, tokenizer: Any, stream: _Batches,
           encode: Callable[[str, str], tuple[list[int], list[int]]], method: MethodSpec, view: Any,
           trainable: list[Any], reference: Any, encoder: Encoder, eval_items: list[dict], budget: Budget,
           evaluator: Any, decide: Callable[[dict[str, Any], str | None, bool], str | None],
           session_start: float, losses: list[float]) -> None:
    """The steps of ``run_training``, until a stop."""
    import torch
    import torch.distributed as dist

    train, tolerance, accum = cfg.train, cfg.tolerance, cfg.train.gradient_accumulation_steps
    anchor: tuple[str, list[Any]] | None = None  # (phase, weights at its start) for a proximal term

    def drain(spent: str) -> bool:
        """The budget is spent: wait for every unmeasured snapshot's result, in step order, and apply the
        stopping rule to each; True once one stops the trial."""
        while state.pending:
            tick = time.perf_counter()
            result = evaluator.poll(block=True) if evaluator is not None else None
            shared = torch.tensor(result or (0, 0.0), dtype=torch.float64)
            if host.world > 1:
                dist.all_reduce(shared)
            state.eval_s += time.perf_counter() - tick
            if decide(_measured(state, shared[0], shared[1]), spent if not state.pending else None, True):
                return True
        return False

    # Restored from a resume checkpoint written while the spent budget's last snapshots were being measured:
    # measure them and stop; training on would go past the budget and evaluate a checkpoint the uninterrupted
    # trial never had.
    spent_before = budget.spent(state.step, state.tokens, state.elapsed_s) if state.pending else None
    if spent_before and drain(spent_before):
        return
    while True:
        tick = time.perf_counter()
        state.step += 1
        examples = [encode(p, r) for _, p, r in stream.next(state.step)]
        step_tokens = sum(len(ids) for ids, _ in examples)
        state.tokens += step_tokens  # every rank sees the same global batch
        local = examples[host.rank::host.world]
        micro = len(local) // accum
        rho, phase = method.proximal_rho(state.step), method.phase(state.step)
        if method.uses_anchor and (anchor is None or anchor[0] != phase):
            # the weights at every phase switch (at the start: the initial ones; after a restart: the restored
            # ones), kept even while the proximal term waits for its warm-up, as the authors' trainer keeps them
            anchor = (phase, [p.detach().clone() for p in trainable])
        loss = objective = 0.0
        for i in range(accum):
            batch = {k: v.to(engine.device) for k, v in
                     collate(local[i * micro:(i + 1) * micro], tokenizer.pad_token_id).items()}
            out = engine(**batch)
            total = method.objective(out.loss, out.logits, batch["labels"], reference(batch) if reference else None)
            if rho and anchor:
                total = total + proximal(trainable, anchor[1], rho)
            engine.backward(total)
            engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
            loss += out.loss.item() / accum
            objective += total.item() / accum
        # One small collective per step keeps every decision identical on all ranks: the mean losses (a NaN on
        # any rank diverges them all) and rank 0's clock for the wall-time budget.
        # With train.async_eval it also carries rank 0's next finished snapshot result (step, capability).
        result = evaluator.poll() if evaluator is not None else None
        shared = torch.tensor([loss, objective, time.perf_counter() - session_start if host.rank == 0 else 0.0,
                               *(result or (0, 0.0))], dtype=torch.float64)
        if host.world > 1:
            dist.all_reduce(shared)
        loss, objective, state.elapsed_s = float(shared[0]) / host.world, float(shared[1]), float(shared[2])
        step_s = time.perf_counter() - tick
        state.train_s += step_s
        if host.on_step:
            host.on_step(state.step, step_s, step_tokens)
        losses.append(loss)  # reported: the task cross-entropy, comparable across methods
        base = {"step": state.step, "tokens": state.tokens, "elapsed_s": state.elapsed_s, "restarts": state.restarts}
        if not (math.isfinite(loss) and math.isfinite(objective)):
            host.report({**base, "capability": float("nan"), "loss": loss, "stop": "diverged", "candidate": "",
                         "levels": "", "kept": "", "model_dir": "", "train_s": state.train_s,
                         "eval_s": state.eval_s}, None)
            return
        if shared[3] > 0 and decide(_measured(state, shared[3], shared[4]), None, True):
            return
        spent = budget.spent(state.step, state.tokens, state.elapsed_s)
        upcoming = next((r["level"] for r in state.rungs if r["kept"] is None), None)
        interval = eval_interval(state.last_capability, upcoming, tolerance, train.eval_every,
                                 train.near_every(),
                                 train.near_margin)
        if state.step - state.last_eval_step < interval and not spent:
            continue
        tick = time.perf_counter()
        out = Path(cfg.checkpoint_dir) / f"step-{state.step}"
        state.last_eval_step = state.step
        if train.async_eval:
            # a snapshot, measured by rank 0's evaluator process while training goes on
            save_model_checkpoint(engine, tokenizer, cfg, out, host.rank)
            state.pending.append({"step": state.step, "capability": None, "tokens": state.tokens,
                                  "elapsed_s": time.perf_counter() - session_start, "model_dir": str(out),
                                  "postprocess": ""})
            if evaluator is not None:
                evaluator.submit(state.step, str(out / "model"))
            state.eval_s += time.perf_counter() - tick
            if spent and drain(spent):
                return
            continue
        with view() if view else nullcontext():
            capability = _capability(engine, encoder, cfg, eval_items, host)
        state.eval_s += time.perf_counter() - tick
        record = {"step": state.step, "capability": capability, "tokens": state.tokens,
                  # rank 0's report is the one that counts
                  "elapsed_s": time.perf_counter() - session_start, "model_dir": str(out), "postprocess": ""}
        if decide(record, spent, False):
            return


def _measured(state: TrainState, step: Any, capability: Any) -> dict[str, Any]:
    """The oldest unmeasured snapshot's record with its result (every rank holds the same list)."""
    record = state.pending.pop(0)
    if record["step"] != int(step):
        raise RuntimeError(f"snapshot results out of order: got step {int(step)}, expected {record['step']}")
    return {**record, "capability": float(capability)}
