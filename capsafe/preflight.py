"""The checks a run makes before anything trains: every prompt fits the engines' context, every LLM judge's
input fits its model, and the training sequence length covers the data (``capsafe.common.context`` has the rules)."""

from __future__ import annotations

from collections.abc import Callable

from capsafe.common.context import (
    capability_prompts,
    encoders_for,
    eval_context,
    judge_context,
    model_context,
    suite_prompts,
    train_seq_len,
)
from capsafe.common.data import Suite, read_jsonl
from capsafe.common.formatting import Encoder, TemplateError, load_tokenizer
from capsafe.errors import SpecError
from capsafe.judging.formats import FORMATS, encode_judge_input, variant_input
from capsafe.spec import Spec
from capsafe.train.config import TrialConfig


def check_eval_context(spec: Spec, paths: dict[str, str], task_eval: list[dict[str, str]], suites: list[Suite],
                       log: Callable[[str], None]) -> int:
    """The pool's context length; raises SpecError (before anything is written) when a suite prompt, a
    capability prompt or an LLM judge's input cannot fit."""
    base = paths["model.path"]
    tokenizer, ctx = load_tokenizer(base), model_context(base)
    model_fmt, eval_fmt = spec.model.prompt_format(), spec.eval.prompt_format(spec.model)
    try:
        prompts = suite_prompts(suites, encoders_for(tokenizer, [eval_fmt, *[m.eval_format(eval_fmt)
                                                                             for m in spec.methods]]),
                                spec.eval.max_new_tokens)
        prompts += capability_prompts(task_eval, encoders_for(tokenizer, [model_fmt, *[m.train_format(model_fmt)
                                                                                      for m in spec.methods]]),
                                      spec.task.max_new_tokens)
    except TemplateError as exc:
        raise SpecError(str(exc)) from None
    length = eval_context(prompts, ctx, spec.eval.max_model_len)
    for i, j in enumerate(spec.eval.llm_judges):
        model = paths[f"eval.llm_judges.{i}.model"]
        judge_tok, fmt = load_tokenizer(model), FORMATS[j.format]
        try:
            use_template = fmt.wants_template(judge_tok, j.chat_template)
        except ValueError as exc:
            raise SpecError(f"eval.llm_judges.{i}: {exc}") from None
        rows = [{"request": it.get("request", it["prompt"]), "response": "", "behavior": it.get("behavior", ""),
                 "context": it.get("context", "")} for s in suites if s.kind == "harmful" for it in s.items]
        inputs = [fmt.build(r, use_template, judge_tok) for r in rows]
        inputs += [variant_input(j.format, v, r, judge_tok) for v in j.prompt_variants for r in rows]
        overhead = max((len(encode_judge_input(judge_tok, inp)) for inp in inputs), default=0)
        response = min(spec.eval.max_new_tokens, 512) if j.format == "harmbench" else spec.eval.max_new_tokens
        new = j.max_new_tokens or fmt.default_max_new_tokens
        need = judge_context(j.name, overhead, response, new, model_context(model), spec.eval.max_model_len)
        length = max(length, need) if spec.eval.max_model_len is None else length
    log(f"context: engines get {length} tokens, each at most its own model's context (the evaluated model's {ctx}"
        f"{'' if spec.eval.max_model_len is None else f', eval.max_model_len {spec.eval.max_model_len}'}); every "
        f"suite and capability prompt fits")
    return length


def resolve_train_len(spec: Spec, trials: list[TrialConfig], log: Callable[[str], None]) -> list[TrialConfig]:
    """The trials with ``train.max_seq_len`` set: the spec's, or the longest example of the data the trials
    will read, within the model's context."""
    if not trials:
        return trials
    base = trials[0].model_path
    tokenizer, ctx = load_tokenizer(base), model_context(base)
    seen: set[tuple[str, str]] = set()
    lengths: list[tuple[str, int]] = []
    for cfg in trials:
        fmt = cfg.prompt_format
        encoder = Encoder(tokenizer, fmt)
        sources = [(cfg.task_train, "answer"), *[(s.path, "response") for s in cfg.extra_sources],
                   *[(s.path, "response") for s in cfg.alignment_sources]]
        for path, field in sources:
            if (repr(fmt), path) in seen:
                continue
            seen.add((repr(fmt), path))
            for n, row in enumerate(read_jsonl(path, ("prompt", field))):
                ids, _ = encoder.example(row["prompt"], row[field], 1 << 30)
                lengths.append((f"{path}:{n + 1}", len(ids)))
    length = train_seq_len(lengths, ctx, spec.train.max_seq_len, log)
    log(f"context: training sequences up to {length} tokens (longest example "
        f"{max((n for _, n in lengths), default=0)}, model context {ctx})")
    return [cfg.with_max_seq_len(length) for cfg in trials]
