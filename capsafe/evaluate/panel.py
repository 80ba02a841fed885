"""The judge panel: every judge turns generation rows into judgments, some of them through the pool.

Rule judges (refusal keywords, degeneracy checks) answer at once; LLM judges (Llama Guard, HarmBench
classifier, StrongREJECT rubric) send their prompts to a judge model in the pool; the coherence judge can add
the base model's perplexity of each response. All of them return a future, so the driver keeps generating
while judges work. Pure: the pool is any object with ``generate`` and ``nll`` returning futures.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from capsafe.common.generation import Completion, Sampling, Target
from capsafe.judging.formats import (
    FORMATS,
    MEASURES_HARM,
    TOO_LONG,
    UNPARSED,
    JudgeInput,
    Verdict,
    encode_judge_input,
    variant_input,
)
from capsafe.judging.rules import (
    COHERENT,
    EMPTY,
    INCOHERENT,
    MEASURES_COHERENCE,
    MEASURES_REFUSAL,
    CoherenceJudge,
    RefusalKeywordJudge,
    is_empty,
)


class Pool(Protocol):
    def generate(self, target: Target, prompts: list[list[int]], sampling: Sampling) -> Future[list[Completion]]: ...

    def nll(self, model: str, prompts: list[list[int]], continuations: list[list[int]]) -> Future[list[float]]: ...


@dataclass(frozen=True)
class Judgment:
    verdict: str
    score: float | None = None
    raw: str | None = None      # the judge model's own output, kept whatever it says


def done(value: Any) -> Future[Any]:
    fut: Future[Any] = Future()
    fut.set_result(value)
    return fut


def then(fut: Future[Any], fn: Callable[[Any], Any]) -> Future[Any]:
    """A future of ``fn(result)``; an exception in either step ends up in the returned future."""
    out: Future[Any] = Future()

    def relay(f: Future[Any]) -> None:
        try:
            out.set_result(fn(f.result()))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on ``out``
            out.set_exception(exc)

    fut.add_done_callback(relay)
    return out


# A row to judge: 'request' (the plain request, before any jailbreak wrapper), 'prompt_ids' (what the model was
# fed, from the tokenization contract), 'response', 'response_ids' (the ids the model generated); optionally
# 'behavior' and 'context' (HarmBench's fields).
Rows = list[dict[str, Any]]


class Judge(Protocol):
    name: str
    measures: tuple[str, ...]  # what its verdicts measure: 'refusal', 'harmful_compliance', 'coherence'

    def start(self, rows: Rows, pool: Pool) -> Future[list[Judgment]]: ...


class RuleJudge:
    def __init__(self, rule: Callable[[str, str], str], name: str, measures: tuple[str, ...]) -> None:
        self.rule, self.name, self.measures = rule, name, measures

    def start(self, rows: Rows, pool: Pool) -> Future[list[Judgment]]:
        return done([Judgment(self.rule(r["request"], r["response"])) for r in rows])


class LLMJudge:
    """A judge model in the pool, fed its published format through the tokenization contract with its own
    tokenizer; output it cannot parse is UNPARSED (kept with its raw text)."""

    measures = MEASURES_HARM

    def __init__(self, name: str, fmt: str, target: Target, tokenizer: Any, max_new_tokens: int | None = None,
                 chat_template: bool | None = None, max_input_tokens: int | None = None,
                 parse: Callable[[str], Verdict] | None = None, variant: str | None = None) -> None:
        self.name, self.target, self.tokenizer = name, target, tokenizer
        self.format, self.variant = FORMATS[fmt], variant
        self.parse = parse or self.format.parse
        self.use_template = self.format.wants_template(tokenizer, chat_template)
        self.sampling = Sampling(max_new_tokens or self.format.default_max_new_tokens)
        self.max_input_tokens = max_input_tokens

    def inputs(self, rows: Rows) -> list[JudgeInput]:
        if self.variant is not None:  # a reworded prompt, sent as its own text
            return [variant_input(self.format.name, self.variant, r, self.tokenizer) for r in rows]
        return [self.format.build(r, self.use_template, self.tokenizer) for r in rows]

    def input_ids(self, rows: Rows) -> list[list[int]]:
        return [encode_judge_input(self.tokenizer, inp) for inp in self.inputs(rows)]

    def start(self, rows: Rows, pool: Pool) -> Future[list[Judgment]]:
        # an empty answer is labelled, not sent: a judge model shown "" says 'safe' / 'no', which a table would
        # count as a judged answer (every judge labels it 'empty', capsafe.judging.rules.EMPTY)
        blank = {n for n, r in enumerate(rows) if is_empty(r["response"])}
        keep = [n for n in range(len(rows)) if n not in blank]
        ids = dict(zip(keep, self.input_ids([rows[n] for n in keep]), strict=True))
        # an input beyond the judge's context is labelled, not sent: the engine would refuse the whole request
        fits = [n for n, x in ids.items() if self.max_input_tokens is None or len(x) <= self.max_input_tokens]

        def judge(outputs: list[Completion]) -> list[Judgment]:
            answers = dict(zip(fits, (o.text for o in outputs), strict=True))
            out = []
            for n in range(len(rows)):
                if n in blank:
                    out.append(Judgment(EMPTY, None, None))
                    continue
                if n not in answers:
                    out.append(Judgment(TOO_LONG, None, None))
                    continue
                v = self.parse(answers[n])
                out.append(Judgment(v.label, v.score, answers[n]))
            return out

        if not fits:
            return done(judge([]))
        return then(pool.generate(self.target, [ids[n] for n in fits], self.sampling), judge)


class CoherenceWithPerplexity:
    """Degeneracy checks plus the base model's perplexity of the response given the prompt ids the model was
    fed: above ``max_perplexity`` (or unmeasurable) counts as incoherent. The score column holds the
    perplexity. What is scored is the ids the model generated (``response_ids``), not a re-tokenization of the
    stripped text: a byte-level tokenizer would lose the answer's leading-space token and score a sequence the
    model never produced (higher perplexity, more answers called incoherent)."""

    name = "coherence"
    measures = MEASURES_COHERENCE

    def __init__(self, base_model: str, max_perplexity: float) -> None:
        self.base_model, self.max_perplexity = base_model, max_perplexity
        self.rule = CoherenceJudge()

    def start(self, rows: Rows, pool: Pool) -> Future[list[Judgment]]:
        scored = [n for n, r in enumerate(rows) if not is_empty(r["response"])]

        def judge(nlls: list[float]) -> list[Judgment]:
            by_row = dict(zip(scored, nlls, strict=True))
            out = []
            for n, row in enumerate(rows):
                if n not in by_row:  # nothing to score: labelled as every judge labels it
                    out.append(Judgment(EMPTY, None))
                    continue
                nll = by_row[n]
                ppl = math.exp(min(nll, 700.0)) if math.isfinite(nll) else None
                ok = self.rule(row["request"], row["response"]) == COHERENT
                ok = ok and ppl is not None and ppl <= self.max_perplexity
                out.append(Judgment(COHERENT if ok else INCOHERENT, ppl))
            return out

        if not scored:
            return done(judge([]))
        nll = pool.nll(self.base_model, [list(rows[n]["prompt_ids"]) for n in scored],
                       [list(rows[n]["response_ids"]) for n in scored])
        return then(nll, judge)


def rule_judge(name: str, refusal_lists: tuple[str, ...] = ("advbench", "capsafe")) -> Judge:
    rules: dict[str, tuple[Callable[[str, str], str], tuple[str, ...]]] = {
        "refusal_keywords": (RefusalKeywordJudge(refusal_lists), MEASURES_REFUSAL),
        "coherence": (CoherenceJudge(), MEASURES_COHERENCE)}
    rule, measures = rules[name]
    return RuleJudge(rule, name, measures)


def judges_kind(judge: Judge, kind: str) -> bool:
    """Whether ``judge`` labels responses of a suite of this kind: harm classifiers judge harmful suites only (a
    'safe' verdict on a benign request says nothing about refusal); refusal and coherence judges judge all."""
    return kind == "harmful" or "harmful_compliance" not in judge.measures


__all__ = ["TOO_LONG", "UNPARSED", "Judge", "Judgment", "LLMJudge", "CoherenceWithPerplexity", "Pool",
           "judges_kind", "rule_judge"]
