"""The evaluation stage of a run: start the pool, re-measure each kept checkpoint's capability through it,
then generate and judge every safety suite. Runs inside the run's Ray session."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from capsafe.common.context import model_context
from capsafe.common.data import Suite
from capsafe.common.formatting import Encoder, PromptFormat, load_tokenizer
from capsafe.common.generation import Completion, Sampling, Target, texts
from capsafe.common.metrics import score
from capsafe.common.results import read_table, write_table
from capsafe.evaluate.fan_out import Encode, evaluate_models
from capsafe.evaluate.http_api import HttpContext, api_key_from_env
from capsafe.evaluate.judge_checks import Labeller, check_judges, check_on_run_answers
from capsafe.evaluate.panel import CoherenceWithPerplexity, Judge, LLMJudge, Pool, rule_judge, then
from capsafe.evaluate.targets import checkpoint_targets
from capsafe.judging.formats import FORMATS, parse_strongreject, variant_name
from capsafe.spec import Spec


def judge_input_limit(spec: Spec, paths: dict[str, str], index: int, context_len: int) -> int:
    """The longest input LLM judge ``index`` may be sent: its engine's context less its own answer."""
    j = spec.eval.llm_judges[index]
    ctx = min(context_len, model_context(paths[f"eval.llm_judges.{index}.model"]))
    return ctx - (j.max_new_tokens or FORMATS[j.format].default_max_new_tokens)


def adapter_slots(spec: Spec, models: dict[tuple[str, int], Target] | None, trials: int) -> int:
    """LoRA adapters the engines must hold: those of ``models``, or when the checkpoints are not known yet
    (streaming) the most the sweep can keep: every level of every trial."""
    if models is not None:
        return len({t.adapter for t in models.values() if t.adapter})
    if spec.train.mode == "lora" and spec.eval.lora_adapters:
        return trials * len(spec.task.levels())
    return 0


def engine_kwargs(spec: Spec, adapters: int, max_model_len: int | None) -> dict[str, Any]:
    """Keyword arguments of every engine in the pool; ``max_model_len`` is the run's context (each engine
    keeps it within its own model's)."""
    kwargs: dict[str, Any] = {"max_model_len": max_model_len}
    if adapters:
        # one slot more than adapters: vLLM on CPU misroutes base rows once every LoRA slot is taken
        kwargs.update(enable_lora=True, max_loras=adapters + 1, max_lora_rank=spec.train.lora.r)
    return kwargs


def make_panel(spec: Spec, paths: dict[str, str], context_len: int | None = None) -> list[Judge]:
    """The rule judges and every LLM judge of the spec, each LLM judge with its own model's tokenizer and the
    longest input its engine takes (``context_len`` less its answer)."""
    judges: list[Judge] = []
    for name in spec.eval.judges:
        if name == "coherence" and spec.eval.max_perplexity is not None:
            judges.append(CoherenceWithPerplexity(paths["model.path"], spec.eval.max_perplexity))
        else:
            judges.append(rule_judge(name, tuple(spec.eval.refusal_keywords)))
    for i, j in enumerate(spec.eval.llm_judges):
        model = paths[f"eval.llm_judges.{i}.model"]
        limit = judge_input_limit(spec, paths, i, context_len) if context_len else None
        parse = partial(parse_strongreject, harmful_from=j.harmful_from) if j.format == "strongreject" else None
        tokenizer = load_tokenizer(model)
        judges.append(LLMJudge(j.name, j.format, Target(model), tokenizer, j.max_new_tokens, j.chat_template, limit,
                               parse))
        for k, variant in enumerate(j.prompt_variants, start=1):
            judges.append(LLMJudge(f"{j.name}@{variant_name(variant, k)}", j.format, Target(model), tokenizer,
                                   j.max_new_tokens, j.chat_template, limit, parse, variant=variant))
    return judges


def models_in_flight(spec: Spec, paths: dict[str, str]) -> int:
    """How many checkpoint models may generate at once: as many as the replicas keep loaded beside the models
    every replica needs all along (the LLM judges' and, for perplexity, the base model)."""
    e = spec.eval
    replicas = e.autoscaling.max_replicas if e.autoscaling else e.replicas
    always = {paths[f"eval.llm_judges.{i}.model"] for i in range(len(e.llm_judges))}
    if e.max_perplexity is not None and "coherence" in e.judges:
        always.add(paths["model.path"])
    return replicas * max(1, e.max_models_per_replica - len(always))


def model_windows(models: dict[tuple[str, int], Target], size: int) -> list[dict[tuple[str, int], Target]]:
    """The checkpoints in groups of at most ``size`` engine models (LoRA adapters on one base engine count
    once), base model first: each group is measured and evaluated before the next, so that every engine is
    loaded once for both."""
    by_engine: dict[str, dict[tuple[str, int], Target]] = {}
    for key, target in models.items():
        by_engine.setdefault(target.model, {})[key] = target
    engines = list(by_engine.values())
    return [{k: v for group in engines[i:i + size] for k, v in group.items()} for i in range(0, len(engines), size)]


def measure_served_capability(spec: Spec, paths: dict[str, str], results_dir: Path, fmt: PromptFormat,
                              tokenizer: Any, pool: Pool, models: dict[tuple[str, int], Target],
                              log: Callable[[str], None]) -> None:
    """Capability of the base model and of every kept checkpoint, measured through the pool on exactly what
    the safety evaluation will run (consolidated model, or adapter on the base engine): on the selection split
    ('served', which must equal what training measured) and on the confirmation split ('confirmed', the
    capability the report compares: the selection split chose the checkpoint, so its own score is biased up)."""
    from capsafe.common.data import read_jsonl
    from capsafe.mitigations import REGISTRY, method_from_json

    selection = read_jsonl(paths["task.eval_file"], ("prompt", "answer"))[: spec.task.eval_size]
    confirm = read_jsonl(paths["task.confirm_file"], ("prompt", "answer")) if "task.confirm_file" in paths else []

    def start(target: Target, trial_fmt: PromptFormat = fmt) -> Future[tuple[float | None, float | None]]:
        """Both splits in one request: each engine is loaded once for its checkpoint's capability."""
        encoder = Encoder(tokenizer, trial_fmt)
        items = selection + confirm
        prompts = [encoder.prompt(it["prompt"]) for it in items]  # the ids the trial was trained and measured on

        def scores(outputs: list[Completion]) -> tuple[float | None, float | None]:
            answers = texts(outputs)

            def part(lo: int, hi: int) -> float | None:
                return score(spec.task.metric, answers[lo:hi], [it["answer"] for it in items[lo:hi]]) \
                    if hi > lo else None
            return part(0, len(selection)), part(len(selection), len(items))

        return then(pool.generate(target, prompts, Sampling(spec.task.max_new_tokens)), scores)

    if ("base", 0) in models and "base" not in set(read_table(results_dir, "trials").column("trial_id").to_pylist()):
        selected, confirmed = start(models[("base", 0)]).result()
        capability = selected or 0.0
        log(f"base model capability: {capability:.3f}" + ("" if confirmed is None else f", {confirmed:.3f} confirmed"))
        write_table(results_dir, "trials", [{
            "trial_id": "base", "method": "base", "seed": None, "learning_rate": None, "target": spec.task.target,
            "tolerance": spec.task.tolerance, "reached": capability >= spec.task.target - spec.task.tolerance,
            "capability": capability,
            "confirmed_capability": confirmed, "step": 0, "status": "base", "stop_reason": "",
            "checkpoint": paths["model.path"], "tokens": 0, "wall_s": 0.0, "train_s": 0.0, "eval_s": 0.0,
            "restarts": 0, "method_params": "{}", "finished_at": datetime.now(UTC)}], fragment="base")
    checkpoints = read_table(results_dir, "checkpoints").to_pylist()
    trials = {t["trial_id"]: t for t in read_table(results_dir, "trials").to_pylist()}
    formats = {tid: method_from_json(t["method"], t["method_params"]).train_format(fmt)
               for tid, t in trials.items() if t["method"] in REGISTRY}
    # every checkpoint's request is sent at once, so that the pool's replicas measure several in parallel
    asked = datetime.now(UTC)
    pending = {(r["trial_id"], r["step"]): start(models[(r["trial_id"], r["step"])], formats.get(r["trial_id"], fmt))
               for r in checkpoints if r["reached"] and r["served_capability"] is None
               and (r["trial_id"], r["step"]) in models}
    for trial_id in dict.fromkeys(r["trial_id"] for r in checkpoints):
        rows = [r for r in checkpoints if r["trial_id"] == trial_id]
        measured = False
        for r in rows:
            if (trial_id, r["step"]) in pending and r["reached"] and r["served_capability"] is None:
                r["served_capability"], r["confirmed_capability"] = pending[(trial_id, r["step"])].result()
                r["confirmed_items"] = len(confirm) if r["confirmed_capability"] is not None else None
                r["evaluation_started_at"] = asked
                measured = True
                confirmed = r["confirmed_capability"]
                log(f"capability of {trial_id} step {r['step']}: {r['capability']:.3f} in training, "
                    f"{r['served_capability']:.3f} served" + ("" if confirmed is None else
                                                              f", {confirmed:.3f} on the confirmation split"))
        if measured:
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


@dataclass
class EvalRun:
    """What every group of models evaluated in one run shares: the spec, the pool and the judges."""

    spec: Spec
    paths: dict[str, str]
    results_dir: Path
    suites: list[Suite]
    log: Callable[[str], None]
    pool: Pool
    panel: list[Judge]

    def evaluate(self, models: dict[tuple[str, int], Target]) -> None:
        """Measure served capability, then generate and judge every suite, for ``models`` (keys already
        complete in the results are skipped), a few engine models at a time."""
        spec, e = self.spec, self.spec.eval
        fmt, eval_fmt = spec.model.prompt_format(), e.prompt_format(spec.model)
        tokenizer = load_tokenizer(self.paths["model.path"])
        sampling = Sampling(e.max_new_tokens, e.temperature, e.top_p, e.seed)
        windows = model_windows(models, models_in_flight(spec, self.paths))
        for n, window in enumerate(windows, start=1):
            # each window measured and then evaluated while its engines are loaded
            if len(windows) > 1:
                self.log(f"evaluate: models {n}/{len(windows)}: "
                         + ", ".join(f"{tid} step {step}" for tid, step in window))
            measure_served_capability(spec, self.paths, self.results_dir, fmt, tokenizer, self.pool, window,
                                      self.log)
            evaluate_models(window, self.suites, Encoder(tokenizer, eval_fmt).prompt, sampling, e.repeats,
                            self.pool, self.panel, e.engine, self.results_dir, self.log,
                            encodes=method_encodes(self.results_dir, eval_fmt, tokenizer),
                            status_every_s=e.status_every_s)


def check_files(spec: Spec, paths: dict[str, str]) -> dict[str, str]:
    """LLM judge name -> its labelled check file (``eval.llm_judges[].check_file``), for the judges that have one."""
    return {j.name: paths[f"eval.llm_judges.{i}.check_file"] for i, j in enumerate(spec.eval.llm_judges)
            if j.check_file is not None}


@contextmanager
def serving(spec: Spec, paths: dict[str, str], results_dir: Path, suites: list[Suite], log: Callable[[str], None],
            context_len: int | None, adapters: int, label_answers: Labeller | None = None) -> Iterator[EvalRun]:
    """The run's generation pool (started on entry, deleted on exit) and what evaluating through it needs;
    ``context_len`` is the engines' context from the pre-flight check (``capsafe.common.context``), ``adapters`` the
    LoRA adapters its engines must hold at once. Judges with a check file are checked through the pool first;
    with ``label_answers`` (the demo world's ground truth) the judges' verdicts on the run's answers are checked
    against it at the end."""
    from capsafe.evaluate.pool_client import PoolClient
    from capsafe.evaluate.serve_pool import build_pool, deployment_options, start_pool, stop_pool

    e = spec.eval
    autoscaling = e.autoscaling.model_dump() if e.autoscaling else None
    http = None if e.http is None else HttpContext(str(results_dir), paths["model.path"], e.lora_adapters,
                                                   e.prompt_format(spec.model).to_dict(), e.max_new_tokens,
                                                   api_key_from_env(e.http.api_key_env))
    checks = results_dir / SWAP_CHECKS
    app = build_pool(e.engine, engine_kwargs(spec, adapters, context_len),
                     deployment_options(e.replicas, e.cpus_per_replica, e.gpus_per_replica, autoscaling),
                     e.max_models_per_replica, e.max_ongoing_requests, http, e.swap_weights, str(checks),
                     e.spare_engines)
    pool_name = f"capsafe-{spec.experiment}"
    size = (f"{e.autoscaling.min_replicas}-{e.autoscaling.max_replicas} (autoscaling)" if e.autoscaling
            else str(e.replicas))
    log(f"evaluate: starting a pool of {size} {e.engine} replica(s)")
    address = None if e.http is None else (e.http.host, e.http.port)
    pool = PoolClient(start_pool(app, pool_name, address), e.request_retries, log)
    if address:
        log(f"evaluate: the pool's OpenAI-compatible API: http://{address[0]}:{address[1]}/v1 (GET /v1/models "
            "lists the checkpoints served so far)")
    try:
        run = EvalRun(spec, paths, results_dir, suites, log, pool, make_panel(spec, paths, context_len))
        check_judges(check_files(spec, paths), run.panel, pool, results_dir, log)
        yield run
        if label_answers is not None:
            check_on_run_answers(results_dir, label_answers, log)
    finally:
        pool.close()
    stop_pool(pool_name)
    for line in swap_check_lines(checks):
        log(line)


SWAP_CHECKS = "engine_checks"  # the pool's weight-swap checks, one JSON file per engine shape


def swap_check_lines(folder: Path) -> list[str]:
    """What the pool's replicas found when they checked a weight swap against a fresh engine, a line each."""
    import json

    lines = []
    for path in sorted(folder.glob("*.json")):
        c = json.loads(path.read_text())
        outcome = "used for this shape" if c["swap_ok"] else "REJECTED: fresh engines served this shape"
        lines.append(f"evaluate: weight swap into a resident engine ({c['swapped_from']} -> {c['checked']}, "
                     f"{c['swap_s']} s): a fresh engine's greedy ids on {c['equal']}/{c['probes']} probe prompts; "
                     f"{outcome}")
    return lines


def run_evaluation(spec: Spec, paths: dict[str, str], results_dir: Path, suites: list[Suite],
                   log: Callable[[str], None], context_len: int | None = None,
                   label_answers: Labeller | None = None) -> None:
    """After the sweep (``eval.schedule: sequential``): start the pool, then measure served capability,
    generate and judge every kept checkpoint of the run."""
    models = checkpoint_targets(spec, paths["model.path"], results_dir)
    with serving(spec, paths, results_dir, suites, log, context_len, adapter_slots(spec, models, 0),
                 label_answers) as run:
        run.evaluate(models)
