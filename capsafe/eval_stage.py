"""The evaluation stage of a run: start the pool, re-measure each kept checkpoint's capability through it,
then generate and judge every safety suite. Runs inside the run's Ray session."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from capsafe.engines import Sampling
from capsafe.evaluate import Encode, Suite, evaluate_models
from capsafe.formatting import Encoder, PromptFormat, load_tokenizer
from capsafe.judge_formats import parse_strongreject
from capsafe.metrics import score
from capsafe.panel import CoherenceWithPerplexity, Judge, LLMJudge, Pool, Target, rule_judge
from capsafe.preflight import judge_input_limit
from capsafe.results import read_table, write_table
from capsafe.spec import Spec
from capsafe.train_model import CHECKPOINT_META


def target_for(checkpoint: str, base_model: str, adapters: bool) -> Target:
    """What the pool runs for a kept checkpoint: a LoRA adapter on the base engine (``adapters``), or a model
    directory of its own (a full fine-tune, or a LoRA adapter merged into its base first)."""
    ckpt = Path(checkpoint)
    meta = json.loads((ckpt / CHECKPOINT_META).read_text())
    if meta["kind"] != "lora":
        return Target(str(ckpt / "model"))
    if adapters:
        return Target(base_model, str(ckpt / "model"))
    merged = ckpt / "merged"
    if not merged.is_dir():
        from peft import AutoPeftModelForCausalLM
        from transformers import AutoTokenizer

        model = AutoPeftModelForCausalLM.from_pretrained(ckpt / "model").merge_and_unload()
        model.save_pretrained(merged)
        AutoTokenizer.from_pretrained(ckpt / "model").save_pretrained(merged)
    return Target(str(merged))


def checkpoint_targets(spec: Spec, base_model: str, results_dir: Path) -> dict[tuple[str, int], Target]:
    """The base model and every kept checkpoint of the run, keyed (trial, step)."""
    models = {("base", 0): Target(base_model)}
    for r in read_table(results_dir, "checkpoints").to_pylist():
        if r["reached"]:
            models[(r["trial_id"], r["step"])] = target_for(r["checkpoint"], base_model, spec.eval.lora_adapters)
    return models


def engine_kwargs(spec: Spec, models: dict[tuple[str, int], Target], max_model_len: int | None) -> dict[str, Any]:
    """Keyword arguments of every engine in the pool; ``max_model_len`` is the run's context (each engine
    keeps it within its own model's)."""
    kwargs: dict[str, Any] = {"max_model_len": max_model_len}
    adapters = {t.adapter for t in models.values() if t.adapter}
    if adapters:
        # one slot more than adapters: vLLM on CPU misroutes base rows once every LoRA slot is taken
        kwargs.update(enable_lora=True, max_loras=len(adapters) + 1, max_lora_rank=spec.train.lora.r)
    return kwargs


def make_panel(spec: Spec, paths: dict[str, str], context_len: int | None = None) -> list[Judge]:
    """The rule judges and every LLM judge of the spec, each LLM judge with its own model's tokenizer and the
    longest input its engine takes (``context_len`` less its answer)."""
    judges: list[Judge] = []
    for name in spec.eval.judges:
        if name == "coherence" and spec.eval.max_perplexity is not None:
            encoder = Encoder(load_tokenizer(paths["model.path"]))
            judges.append(CoherenceWithPerplexity(paths["model.path"], spec.eval.max_perplexity, encoder))
        else:
            judges.append(rule_judge(name, tuple(spec.eval.refusal_keywords)))
    for i, j in enumerate(spec.eval.llm_judges):
        model = paths[f"eval.llm_judges.{i}.model"]
        limit = judge_input_limit(spec, paths, i, context_len) if context_len else None
        parse = partial(parse_strongreject, harmful_from=j.harmful_from) if j.format == "strongreject" else None
        judges.append(LLMJudge(j.name, j.format, Target(model), load_tokenizer(model), j.max_new_tokens,
                               j.chat_template, limit, parse))
    return judges


def measure_served_capability(spec: Spec, paths: dict[str, str], results_dir: Path, fmt: PromptFormat,
                              tokenizer: Any, pool: Pool, models: dict[tuple[str, int], Target],
                              log: Callable[[str], None]) -> None:
    """Capability of the base model and of every kept checkpoint, measured through the pool on exactly what
    the safety evaluation will run (consolidated model, or adapter on the base engine): on the selection split
    ('served', which must equal what training measured) and on the confirmation split ('confirmed', the
    capability the report compares: the selection split chose the checkpoint, so its own score is biased up)."""
    from capsafe.data import read_jsonl
    from capsafe.mitigations import REGISTRY, method_from_json

    selection = read_jsonl(paths["task.eval_file"], ("prompt", "answer"))[: spec.task.eval_size]
    confirm = read_jsonl(paths["task.confirm_file"], ("prompt", "answer")) if "task.confirm_file" in paths else []

    def measure(target: Target, items: list[dict], trial_fmt: PromptFormat = fmt) -> float | None:
        if not items:
            return None
        encoder = Encoder(tokenizer, trial_fmt)
        prompts = [encoder.prompt(it["prompt"]) for it in items]  # the ids the trial was trained and measured on
        outputs = pool.generate(target, prompts, Sampling(spec.task.max_new_tokens)).result()
        return score(spec.task.metric, outputs, [it["answer"] for it in items])

    if "base" not in set(read_table(results_dir, "trials").column("trial_id").to_pylist()):
        capability = measure(models[("base", 0)], selection) or 0.0
        confirmed = measure(models[("base", 0)], confirm)
        log(f"base model capability: {capability:.3f}" + ("" if confirmed is None else f", {confirmed:.3f} confirmed"))
        write_table(results_dir, "trials", [{
            "trial_id": "base", "method": "base", "seed": None, "learning_rate": None, "target": spec.task.target,
            "tolerance": spec.task.tolerance, "reached": capability >= spec.task.target - spec.task.tolerance,
            "capability": capability,
            "confirmed_capability": confirmed, "step": 0, "status": "base", "stop_reason": "",
            "checkpoint": paths["model.path"], "tokens": 0, "wall_s": 0.0, "train_s": 0.0, "eval_s": 0.0,
            "restarts": 0, "method_params": "{}"}], fragment="base")
    checkpoints = read_table(results_dir, "checkpoints").to_pylist()
    trials = {t["trial_id"]: t for t in read_table(results_dir, "trials").to_pylist()}
    formats = {tid: method_from_json(t["method"], t["method_params"]).train_format(fmt)
               for tid, t in trials.items() if t["method"] in REGISTRY}
    for trial_id in dict.fromkeys(r["trial_id"] for r in checkpoints):
        rows = [r for r in checkpoints if r["trial_id"] == trial_id]
        done: dict[int, tuple[float | None, float | None]] = {}
        for r in rows:
            if r["reached"] and r["served_capability"] is None:
                model, trial_fmt = models[(trial_id, r["step"])], formats.get(trial_id, fmt)
                if r["step"] not in done:
                    done[r["step"]] = (measure(model, selection, trial_fmt), measure(model, confirm, trial_fmt))
                r["served_capability"], r["confirmed_capability"] = done[r["step"]]
                confirmed = r["confirmed_capability"]
                log(f"capability of {trial_id} step {r['step']}: {r['capability']:.3f} in training, "
                    f"{r['served_capability']:.3f} served" + ("" if confirmed is None else
                                                              f", {confirmed:.3f} on the confirmation split"))
        if done:
            write_table(results_dir, "checkpoints", rows, fragment=trial_id)
            trial = trials.get(trial_id)
            kept = next((r for r in rows if trial and r["step"] == trial["step"] and r["reached"]), None)
            if trial is not None and kept is not None:  # the trials row carries its target checkpoint's number
                write_table(results_dir, "trials", [{**trial, "confirmed_capability": kept["confirmed_capability"]}],
                            fragment=trial_id)


def method_encodes(results_dir: Path, eval_fmt: PromptFormat, tokenizer: Any) -> dict[str, Encode]:
    """Per trial whose method shows the suites in a format of its own (PTST), that format's prompt encoder."""
    from capsafe.mitigations import REGISTRY, method_from_json

    encodes: dict[str, Encode] = {}
    for t in read_table(results_dir, "trials").to_pylist():
        if t["method"] not in REGISTRY:
            continue  # the base model's row
        fmt = method_from_json(t["method"], t["method_params"]).eval_format(eval_fmt)
        if fmt != eval_fmt:
            encodes[t["trial_id"]] = Encoder(tokenizer, fmt).prompt
    return encodes


def run_evaluation(spec: Spec, paths: dict[str, str], results_dir: Path, suites: list[Suite],
                   log: Callable[[str], None], context_len: int | None = None) -> None:
    """Start the pool, measure served capability, generate and judge; ``context_len`` is the engines'
    context from the pre-flight check (``capsafe.context``)."""
    from capsafe.pool_client import PoolClient
    from capsafe.serve_pool import build_pool, deployment_options, start_pool, stop_pool

    e = spec.eval
    models = checkpoint_targets(spec, paths["model.path"], results_dir)
    autoscaling = e.autoscaling.model_dump() if e.autoscaling else None
    app = build_pool(e.engine, engine_kwargs(spec, models, context_len),
                     deployment_options(e.replicas, e.cpus_per_replica, e.gpus_per_replica, autoscaling),
                     e.max_models_per_replica, e.max_ongoing_requests)
    pool_name = f"capsafe-{spec.experiment}"
    size = (f"{e.autoscaling.min_replicas}-{e.autoscaling.max_replicas} (autoscaling)" if e.autoscaling
            else str(e.replicas))
    log(f"evaluate: starting a pool of {size} {e.engine} replica(s)")
    pool = PoolClient(start_pool(app, pool_name), e.request_retries, log)
    try:
        fmt, eval_fmt = spec.model.prompt_format(), e.prompt_format(spec.model)
        tokenizer = load_tokenizer(paths["model.path"])
        measure_served_capability(spec, paths, results_dir, fmt, tokenizer, pool, models, log)
        sampling = Sampling(e.max_new_tokens, e.temperature, e.top_p, e.seed)
        evaluate_models(models, suites, Encoder(tokenizer, eval_fmt).prompt, sampling, e.repeats, pool,
                        make_panel(spec, paths, context_len), e.engine, results_dir, log,
                        encodes=method_encodes(results_dir, eval_fmt, tokenizer), status_every_s=e.status_every_s)
    finally:
        pool.close()
    stop_pool(pool_name)

