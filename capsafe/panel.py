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

from capsafe.engines import Sampling
from capsafe.judge_formats import (
    UNPARSED,
    Verdict,
    harmbench_prompt,
    llama_guard_prompt,
    parse_harmbench,
    parse_llama_guard,
    parse_strongreject,
    strongreject_prompt,
)
from capsafe.judges import COHERENT, INCOHERENT, CoherenceJudge, RefusalKeywordJudge


@dataclass(frozen=True)
class Target:
    """What a request runs on: an engine model (multiplexed id) and optionally a LoRA adapter on it."""

    model: str
    adapter: str | None = None


class Pool(Protocol):
    def generate(self, target: Target, prompts: list[str], sampling: Sampling) -> Future[list[str]]: ...

    def nll(self, model: str, prompts: list[str], continuations: list[str]) -> Future[list[float]]: ...


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


# A row to judge: 'request' (the plain request, before any jailbreak wrapper), 'prompt' (what the model was
# asked, as rendered), 'response'.
Rows = list[dict[str, str]]


class Judge(Protocol):
    name: str

    def start(self, rows: Rows, pool: Pool) -> Future[list[Judgment]]: ...


class RuleJudge:
    def __init__(self, rule: Callable[[str, str], str], name: str) -> None:
        self.rule, self.name = rule, name

    def start(self, rows: Rows, pool: Pool) -> Future[list[Judgment]]:
        return done([Judgment(self.rule(r["request"], r["response"])) for r in rows])


FORMATS: dict[str, tuple[Callable[[str, str], str], Callable[[str], Verdict]]] = {
    "llama_guard": (llama_guard_prompt, parse_llama_guard),
    "harmbench": (harmbench_prompt, parse_harmbench),
    "strongreject": (strongreject_prompt, parse_strongreject),
}


class LLMJudge:
    """A judge model in the pool, prompted in a published format; output it cannot parse is UNPARSED."""

    def __init__(self, name: str, fmt: str, target: Target, render: Callable[[str], str],
                 max_new_tokens: int) -> None:
        self.name, self.target, self.render = name, target, render
        self.build, self.parse = FORMATS[fmt]
        self.sampling = Sampling(max_new_tokens)

    def start(self, rows: Rows, pool: Pool) -> Future[list[Judgment]]:
        prompts = [self.render(self.build(r["request"], r["response"])) for r in rows]

        def judge(outputs: list[str]) -> list[Judgment]:
            verdicts = [self.parse(text) for text in outputs]
            return [Judgment(v.label, v.score, raw) for v, raw in zip(verdicts, outputs, strict=True)]

        return then(pool.generate(self.target, prompts, self.sampling), judge)


class CoherenceWithPerplexity:
    """Degeneracy checks plus the base model's perplexity of the response given the prompt: above
    ``max_perplexity`` (or unmeasurable) counts as incoherent. The score column holds the perplexity."""

    name = "coherence"

    def __init__(self, base_model: str, max_perplexity: float) -> None:
        self.base_model, self.max_perplexity = base_model, max_perplexity
        self.rule = CoherenceJudge()

    def start(self, rows: Rows, pool: Pool) -> Future[list[Judgment]]:
        def judge(nlls: list[float]) -> list[Judgment]:
            out = []
            for row, nll in zip(rows, nlls, strict=True):
                ppl = math.exp(min(nll, 700.0)) if math.isfinite(nll) else None
                ok = self.rule(row["request"], row["response"]) == COHERENT
                ok = ok and ppl is not None and ppl <= self.max_perplexity
                out.append(Judgment(COHERENT if ok else INCOHERENT, ppl))
            return out

        nll = pool.nll(self.base_model, [r["prompt"] for r in rows], [r["response"] for r in rows])
        return then(nll, judge)


def rule_judge(name: str) -> Judge:
    rules: dict[str, Callable[[str, str], str]] = {"refusal_keywords": RefusalKeywordJudge(),
                                                    "coherence": CoherenceJudge()}
    return RuleJudge(rules[name], name)


__all__ = ["UNPARSED", "Judge", "Judgment", "LLMJudge", "CoherenceWithPerplexity", "Pool", "Target", "rule_judge"]
