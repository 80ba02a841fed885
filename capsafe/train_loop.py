"""The per-worker fine-tuning loop run by Ray Train: HF model (+ LoRA) under DeepSpeed ZeRO-2/3.

Every ``eval_every`` steps all ranks run a batched greedy capability evaluation on their shard of the
held-out split; rank 0 reports the metrics, with a checkpoint only when the target is reached, and the
loop ends there (the Tune stopper applies the same rule to the reported result).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from capsafe.capability import METRICS, stop_reason
from capsafe.data import Source, batches, read_jsonl
from capsafe.ds_config import deepspeed_config
from capsafe.engines import greedy_generate
from capsafe.formatting import collate, encode_example, render_prompt

CHECKPOINT_META = "capsafe_checkpoint.json"


def _capability(engine: Any, tokenizer: Any, cfg: dict[str, Any], items: list[dict], rank: int,
                world: int) -> float:
    """Metric over the held-out items, computed shard-wise and summed over ranks."""
    import torch
    import torch.distributed as dist

    mine = items[rank::world]
    per_rank = math.ceil(len(items) / world)
    valid = len(mine)
    # Every rank must run the same number of forward passes under ZeRO-3 (parameters are gathered
    # collectively), so short shards are padded with a repeated item whose result is ignored.
    mine = mine + [items[0]] * (per_rank - valid)
    prompts = [render_prompt(cfg["prompt_template"], it["prompt"]) for it in mine]
    engine.module.eval()
    preds = greedy_generate(engine.module, tokenizer, prompts, cfg["eval_max_new_tokens"],
                            batch_size=cfg["eval_batch_size"], synced_gpus=world > 1)
    engine.module.train()
    metric = METRICS[cfg["metric"]]
    score = metric(preds[:valid], [it["answer"] for it in mine[:valid]]) * valid if valid else 0.0
    totals = torch.tensor([score, float(valid)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(totals)
    return float(totals[0] / totals[1])


def _save_model(engine: Any, tokenizer: Any, cfg: dict[str, Any], out: Path, rank: int) -> None:
    """Write a loadable HF model (full) or PEFT adapter (LoRA) to ``out`` on rank 0; all ranks must call."""
    import deepspeed

    params = list(engine.module.parameters())
    # Under ZeRO-3 each rank holds a shard; gathering is collective, so every rank enters the context.
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if cfg["zero_stage"] == 3 \
        else nullcontext()
    with gather:
        if rank == 0:
            engine.module.save_pretrained(out / "model", safe_serialization=True)
            tokenizer.save_pretrained(out / "model")
    if rank == 0:
        meta = {"kind": cfg["mode"], "base_model": cfg["model_path"], "trial_id": cfg["trial_id"]}
        (out / CHECKPOINT_META).write_text(json.dumps(meta))


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Ray Train entry point; ``cfg`` is one trial's plain-value config (see ``capsafe.trials``)."""
    import deepspeed
    import ray.train
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Ray Train logs every report at INFO from every rank; the driver's progress lines say the same once.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg["seed"])
    # One intra-op thread per reserved CPU: oversubscribed OpenMP threads spin and were ~10x slower here.
    torch.set_num_threads(cfg["torch_threads"])
    tokenizer = AutoTokenizer.from_pretrained(cfg["model_path"])
    model: Any = AutoModelForCausalLM.from_pretrained(cfg["model_path"], dtype=torch.float32)
    if cfg["mode"] == "lora":
        from peft import LoraConfig, get_peft_model

        lora = cfg["lora"]
        model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"],
                                                 lora_dropout=lora["dropout"],
                                                 target_modules=lora["target_modules"], task_type="CAUSAL_LM"))
    ds_cfg = deepspeed_config(cfg["zero_stage"], cfg["batch_size"], world, cfg["lr"], cfg["weight_decay"],
                              cfg["grad_clip"])
    engine, *_ = deepspeed.initialize(model=model, config=ds_cfg,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])

    task = [(r["prompt"], r["answer"]) for r in read_jsonl(cfg["task_train"], ("prompt", "answer"))]
    extras = [Source(s["name"], [(r["prompt"], r["response"]) for r in read_jsonl(s["path"], ("prompt", "response"))],
                     s["weight"]) for s in cfg["extra_sources"]]
    sources = [Source("task", task, 1.0 - sum(s.weight for s in extras)), *extras]
    eval_items = read_jsonl(cfg["task_eval"], ("prompt", "answer"))[: cfg["eval_size"]]
    encoded: dict[tuple[str, str], tuple[list[int], list[int]]] = {}

    def encode(prompt: str, response: str) -> tuple[list[int], list[int]]:
        key = (prompt, response)
        if key not in encoded:
            encoded[key] = encode_example(tokenizer, cfg["prompt_template"], prompt, response, cfg["max_seq_len"])
        return encoded[key]

    start, tokens, losses = time.perf_counter(), 0, []
    stream = batches(sources, cfg["batch_size"], cfg["seed"])
    for step in range(1, cfg["max_steps"] + 1):
        local = next(stream)[rank::world]
        batch = collate([encode(p, r) for _, p, r in local], tokenizer.pad_token_id)
        tokens += int(batch["attention_mask"].sum()) * world
        out = engine(**{k: v.to(engine.device) for k, v in batch.items()})
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
        if not math.isfinite(losses[-1]):
            ray.train.report({"step": step, "capability": float("nan"), "loss": losses[-1], "tokens": tokens,
                              "elapsed_s": time.perf_counter() - start, "stop": "diverged"})
            return
        if step % cfg["eval_every"] and step != cfg["max_steps"]:
            continue
        capability = _capability(engine, tokenizer, cfg, eval_items, rank, world)
        reason = stop_reason(capability, step, cfg["target"], cfg["max_steps"])
        metrics = {"step": step, "capability": capability, "loss": sum(losses) / len(losses), "tokens": tokens,
                   "elapsed_s": time.perf_counter() - start, "stop": reason or ""}
        losses = []
        if reason == "reached":
            with tempfile.TemporaryDirectory(prefix="capsafe-ckpt-") as tmp:
                _save_model(engine, tokenizer, cfg, Path(tmp), rank)
                ckpt = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
                ray.train.report(metrics, checkpoint=ckpt)
        else:
            ray.train.report(metrics)
        if reason:
            return
