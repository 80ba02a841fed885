"""``capsafe validate --plan``: what a run would read and hold, worked out before anything trains or any GPU is
held. Every input is resolved and read exactly as ``capsafe run`` reads it (hub ids fetched, the demo world built
where a field says ``demo``), so a plan that prints is a run that starts; a bad input fails here the same way.

The GPU-hours figure is an upper bound from the spec's budgets, never an estimate: a trial cannot run longer than
``train.max_wall_s`` (training and its capability evaluations, summed over restarts), so training holds at most
trials x workers x that. What no budget bounds (a trial without ``max_wall_s``, the pool's safety evaluation) is
named as unbounded rather than guessed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from capsafe.common.context import encoders_for, model_context, train_seq_len
from capsafe.common.data import Suite, read_check_file
from capsafe.common.formatting import Encoder, load_tokenizer
from capsafe.preflight import check_eval_context
from capsafe.run_inputs import check_judge_files, load_suites, load_task, resolve_paths
from capsafe.spec import DEMO, Spec
from capsafe.train.trials import plan_trials


def _span(lengths: list[int]) -> str:
    if not lengths:
        return "no items"
    return f"{min(lengths)} tokens" if min(lengths) == max(lengths) else f"{min(lengths)}-{max(lengths)} tokens"


def _source(spec_value: str, resolved: str) -> str:
    return f"demo world ({resolved})" if spec_value == DEMO else resolved


def input_lines(spec: Spec, paths: dict[str, str], records: dict[str, list[dict[str, str]]],
                suites: list[Suite], tokenizer: Any) -> list[str]:
    """One line per input: where it comes from, how many items the run uses, and their length in the model's
    tokens as the run renders them (task examples as training sees prompt + answer, capability and suite prompts
    as the engines are sent them)."""
    declared = spec.data_paths()
    model_fmt, eval_fmt = spec.model.prompt_format(), spec.eval.prompt_format(spec.model)
    train_encoders = encoders_for(tokenizer, [model_fmt, *[m.train_format(model_fmt) for m in spec.methods]])
    eval_encoders = encoders_for(tokenizer, [eval_fmt, *[m.eval_format(eval_fmt) for m in spec.methods]])
    lines = [f"  model.path: {_source(declared['model.path'], paths['model.path'])}, context "
             f"{model_context(paths['model.path'])} tokens"]
    for field, rows in records.items():
        if field == "task.train_file":
            lengths = [len(enc.example(r["prompt"], r["answer"], None)[0]) for enc in train_encoders.values()
                       for r in rows]
            what = "training examples (prompt + answer)"
        else:
            lengths = [len(enc.prompt(r["prompt"])) for enc in train_encoders.values() for r in rows]
            what = "capability prompts"
        source = declared.get(field) or declared["task.train_file"]  # selection carved off the training data
        carved = " (carved off the training data)" if field == "task.eval_file" and \
            spec.task.selection_from_train is not None else ""
        lines.append(f"  {field}: {_source(source, paths.get(field, paths['task.train_file']))}{carved}: "
                     f"{len(rows)} {what}, {_span(lengths)}")
    limit = spec.eval.max_prompts_per_suite
    for i, suite in enumerate(suites):
        cap = f" (at most eval.max_prompts_per_suite {limit})" if limit is not None else ""
        lengths = [len(enc.prompt(it["prompt"])) for enc in eval_encoders.values() for it in suite.items]
        field = f"eval.suites.{i}.file"
        lines.append(f"  suite '{suite.name}' ({suite.kind}): {_source(declared[field], paths[field])}: "
                     f"{len(suite.items)} prompts{cap}, "
                     f"{_span(lengths)}")
    for i, judge in enumerate(spec.eval.llm_judges):
        model = paths[f"eval.llm_judges.{i}.model"]
        lines.append(f"  eval.llm_judges.{i}.model ('{judge.name}', {judge.format} format): "
                     f"{_source(declared[f'eval.llm_judges.{i}.model'], model)}, context {model_context(model)} tokens")
        if judge.check_file is not None:
            field = f"eval.llm_judges.{i}.check_file"
            lines.append(f"  {field}: {_source(declared[field], paths[field])}: "
                         f"{len(read_check_file(paths[field]))} labelled conversations")
    for field in sorted(paths):
        if field.startswith("methods."):
            lines.append(f"  {field}: {_source(declared[field], paths[field])}")
    return lines


def train_length_line(spec: Spec, records: dict[str, list[dict[str, str]]], tokenizer: Any, ctx: int) -> str:
    """The training sequence length the run will use, from the task's examples (methods' own data adds to it
    at run time)."""
    model_fmt = spec.model.prompt_format()
    lengths = [(f"task.train_file:{n + 1}", len(Encoder(tokenizer, fmt).example(r["prompt"], r["answer"], None)[0]))
               for fmt in {repr(f): f for f in [model_fmt, *[m.train_format(model_fmt)
                                                            for m in spec.methods]]}.values()
               for n, r in enumerate(records["task.train_file"])]
    notes: list[str] = []
    length = train_seq_len(lengths, ctx, spec.train.max_seq_len, notes.append)
    return "\n".join([f"context: training sequences up to {length} tokens (model context {ctx})", *notes])


def gpu_hours_lines(spec: Spec, n_trials: int) -> list[str]:
    """The most GPU-hours the budgets allow, and what they leave unbounded."""
    t, e, s = spec.train, spec.eval, spec.sweep
    train_gpus = t.num_workers if t.use_gpu else 0
    replicas = e.autoscaling.max_replicas if e.autoscaling else e.replicas
    pool_gpus = e.gpus_per_replica * replicas
    if not train_gpus and not pool_gpus:
        return ["GPU-hours: none (train.use_gpu is false and eval.gpus_per_replica is 0: a CPU run)"]
    lines = []
    if not train_gpus:
        lines.append("training: no GPUs (train.use_gpu false)")
    elif t.max_wall_s is None:
        lines.append(f"training: {n_trials} trial(s) x {train_gpus} GPU(s), not bounded in time: no train.max_wall_s "
                     f"(train.max_steps {t.max_steps} bounds the steps, not the hours); set train.max_wall_s for a "
                     "bound")
    else:
        hours = n_trials * train_gpus * t.max_wall_s / 3600
        lines.append(f"training: at most {hours:.1f} GPU-hours ({n_trials} trial(s) x {train_gpus} GPU(s) x "
                     f"train.max_wall_s {t.max_wall_s:g} s)")
    if pool_gpus:
        held = f"{pool_gpus:g} GPU(s) ({replicas} replica(s) x eval.gpus_per_replica {e.gpus_per_replica:g})"
        if spec.eval.schedule == "streaming" and t.max_wall_s is not None:
            waves = math.ceil(n_trials / max(1, min(s.max_concurrent_trials, n_trials)))
            sweep_h = waves * t.max_wall_s / 3600
            lines.append(f"pool: {held} held beside training, at most {pool_gpus * sweep_h:.1f} GPU-hours while the "
                         f"sweep runs ({waves} wave(s) of trials x train.max_wall_s), plus the evaluation of the last "
                         "checkpoints, which no budget bounds")
        else:
            lines.append(f"pool: {held} while it evaluates; no budget bounds the safety evaluation's time")
    return ["GPU-hours (an upper bound from the budgets, not an estimate):", *[f"  {line}" for line in lines]]


def plan(spec: Spec, address: str | None, log: Callable[[str], None]) -> list[str]:
    """The plan's lines. Reads every input and checks every context as a run does (SpecError / DataError on a
    problem, before anything is written); with ``address`` (or the spec's ray_address) connects to that cluster
    and checks the run's resources against it."""
    paths = resolve_paths(spec, log)
    records, suites = load_task(spec, paths), load_suites(spec, paths)
    check_judge_files(spec, paths)
    notes: list[str] = []
    check_eval_context(spec, paths, records["task.eval_file"], suites, notes.append)
    tokenizer, ctx = load_tokenizer(paths["model.path"]), model_context(paths["model.path"])
    # the selection split carved off the training data has no file of its own until the run writes it
    n_trials = len(plan_trials(spec, {"task.eval_file": paths["task.train_file"], **paths},
                               spec.results_dir / "models"))
    lines = ["inputs (as the run reads them; token lengths under the model's tokenizer and prompt format):",
             *input_lines(spec, paths, records, suites, tokenizer), *notes,
             train_length_line(spec, records, tokenizer, ctx)]
    from capsafe.runtime.capacity import peak_text

    beside = spec.eval.schedule == "streaming"
    where = address or spec.ray_address
    if where:
        from capsafe.runtime.capacity import check_cluster
        from capsafe.runtime.ray_shell import ray_session

        with ray_session(where, 0.0):
            check_cluster(spec, lines.append, beside)
    else:
        lines.append(f"capacity: the run holds at most {peak_text(spec, beside)} at once; not checked against a "
                     "cluster (pass --address HEAD:6379 to check it against one)")
    lines += gpu_hours_lines(spec, n_trials)
    return lines
