"""Safety evaluation driver logic: fan (checkpoint x suite x repeat) requests out to the generation pool,
stream the answers into Parquet as they arrive, and have every judge of the panel label them.

Keys: a generation is (trial, step, suite, prompt, repeat); a judgment adds the judge. One generations
fragment per (trial, step, suite) and one judgments fragment per (trial, step, suite, judge), each written
atomically once complete, so a rerun redoes only what is missing (a new judge on old generations, say) and
nothing is written twice. The pool is any object whose calls return futures (``capsafe.evaluate.pool_client`` in
production), so this module never imports Ray.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from capsafe.common.data import Suite
from capsafe.common.generation import Completion, Sampling, Target
from capsafe.common.results import fragment_key, has_fragment, read_fragment, write_table
from capsafe.evaluate.panel import Judge, Judgment, Pool, judges_kind
from capsafe.judging.formats import UNPARSED


def repeat_sampling(sampling: Sampling, repeat: int) -> Sampling:
    """Repeat r decodes with seed ``sampling.seed + r`` (recorded with each generation)."""
    return dataclasses.replace(sampling, seed=(sampling.seed or 0) + repeat)


@dataclass
class _Job:
    """One (checkpoint, suite): its generation parts, then its judges."""

    trial_id: str
    step: int
    suite: Suite
    target: Target
    first_repeat: int = 0  # the repeats this job's generations fragment holds start here
    parts: dict[tuple[int, int], list[Completion]] = field(default_factory=dict)  # (repeat, chunk) -> answers
    expected: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    judges_left: int = 0


Encode = Callable[[str], list[int]]  # request -> prompt ids (``capsafe.common.formatting.Encoder.prompt``)


def evaluate_models(models: dict[tuple[str, int], Target], suites: list[Suite], encode: Encode,
                    sampling: Sampling, repeats: int, pool: Pool, judges: list[Judge], engine_name: str,
                    results_dir: Path, log: Callable[[str], None], chunk: int = 32,
                    encodes: dict[str, Encode] | None = None, status_every_s: float = 0.0,
                    models_in_flight: int | None = None) -> int:
    """Generate and judge every (checkpoint, suite) not already complete in the results; return how many.

    Each engine model's first request goes out alone and the rest follow once it has answered: by then one
    replica has that model's engine loaded, so the pool routes the rest there instead of loading it on every
    replica. Different models still load in parallel on different replicas. A request that fails for good
    (after the pool client's retries) fails the run once every other answer is written; a rerun continues.
    ``encodes`` overrides ``encode`` per trial (a method that evaluates with its own prompt format).
    With ``status_every_s`` a status line (requests answered, pairs judged, time left) is logged at least
    that often, so a long (checkpoint, suite) pair does not look like a hang. ``models_in_flight`` bounds how
    many engine models have generation requests out at once (the next starts when one has all its answers):
    with more models than the replicas keep loaded, interleaved requests would make them load engines over and
    over.
    """
    def encode_for(job: _Job) -> Encode:
        return (encodes or {}).get(job.trial_id, encode)

    start = time.perf_counter()
    handlers: dict[Future[Any], Callable[[Any], None]] = {}
    waiting: dict[str, list[tuple[_Job, tuple[int, int], list[list[int]], Sampling]]] = {}  # engine model -> parts
    loaded: set[str] = set()  # engine models whose first request has answered
    planned: dict[str, list[tuple[_Job, tuple[int, int], list[list[int]], Sampling]]] = {}  # not sent yet
    outstanding: dict[str, int] = {}  # engine model -> generation requests not answered yet
    held: list[str] = []  # engine models waiting for a place in flight
    jobs: list[_Job] = []
    finished = [0]
    answered = [0]  # generation requests answered so far

    def send(job: _Job, part: tuple[int, int], prompts: list[list[int]], samp: Sampling) -> None:
        handlers[pool.generate(job.target, prompts, samp)] = lambda out: receive(job, part, out)

    def receive(job: _Job, part: tuple[int, int], responses: list[Completion]) -> None:
        answered[0] += 1
        job.parts[part] = responses
        loaded.add(job.target.model)
        for queued in waiting.pop(job.target.model, []):  # the engine is loaded somewhere now
            send(*queued)
        outstanding[job.target.model] -= 1
        if not outstanding[job.target.model] and held:  # this model is done generating: the next may start
            release(held.pop(0))
        if len(job.parts) == job.expected:
            write_generations(job)

    def release(model: str) -> None:
        """Send the generation requests of ``model``'s jobs: its first request alone, the rest once it has
        answered (by then one replica has the engine loaded and the pool routes the rest there)."""
        parts = planned.pop(model)
        if model in loaded:
            for p in parts:
                send(*p)
            return
        send(*parts.pop(0))
        waiting.setdefault(model, []).extend(parts)

    def write_generations(job: _Job) -> None:
        rows, now = [], datetime.now(UTC)
        for repeat in range(job.first_repeat, repeats):
            answers = [a for (r, _), part in sorted(job.parts.items()) if r == repeat for a in part]
            seed = repeat_sampling(sampling, repeat).seed
            for item, answer in zip(job.suite.items, answers, strict=True):
                rows.append({**_key(job, item, repeat), "seed": seed, "prompt": item["prompt"],
                             "response": answer.text, "response_ids": list(answer.token_ids),
                             "finish_reason": answer.finish_reason, "engine": engine_name, "generated_at": now})
        write_table(results_dir, "generations", rows, fragment=_gkey(job))
        start_judges(job, rows)

    def start_judges(job: _Job, rows: list[dict[str, Any]]) -> None:
        job.rows = rows
        todo = [j for j in _applicable(judges, job.suite) if not has_fragment(results_dir, "judgments", _jkey(job, j))]
        job.judges_left = len(todo)
        items = {str(it["id"]): it for it in job.suite.items}
        encode_job = encode_for(job)
        inputs = [_judge_row(items[r["prompt_id"]], r, encode_job) for r in rows]
        for judge in todo:
            # a harm classifier sees the harmful rows of a mixed suite only
            mine = [n for n, r in enumerate(rows) if judges_kind(judge, r["suite_kind"])]
            handlers[judge.start([inputs[n] for n in mine], pool)] = _bind(judged, job, judge, mine)
        if not todo:
            report(job, [])

    def judged(job: _Job, judge: Judge, mine: list[int], judgments: list[Judgment]) -> None:
        out = [{**{k: r[k] for k in ("trial_id", "step", "suite", "suite_kind", "prompt_id", "repeat")},
                "judge": judge.name, "measures": ",".join(judge.measures), "verdict": j.verdict, "score": j.score,
                "raw": j.raw}
               for r, j in zip([job.rows[n] for n in mine], judgments, strict=True)]
        write_table(results_dir, "judgments", out, fragment=_jkey(job, judge))
        unparsed = sum(j.verdict == UNPARSED for j in judgments)
        job.judges_left -= 1
        note = [f"{judge.name}: {unparsed} unparsed"] if unparsed else []
        if job.judges_left == 0:
            report(job, note)

    def report(job: _Job, notes: list[str]) -> None:
        finished[0] += 1
        extra = f" ({'; '.join(notes)})" if notes else ""
        spent = time.perf_counter() - start
        eta = spent / finished[0] * (len(jobs) - finished[0])
        log(f"evaluate: [{finished[0]}/{len(jobs)}] {job.trial_id} step {job.step} on {job.suite.name}: "
            f"{len(job.rows)} responses judged{extra}; {spent:.0f} s so far, ~{eta:.0f} s to go")

    for (trial_id, step), target in models.items():
        for suite in suites:
            covered = 0  # repeats 0..covered-1 have generations: judge what they lack
            while has_fragment(results_dir, "generations", fragment_key(trial_id, step, suite.name, covered)):
                job = _Job(trial_id, step, suite, target, covered)
                present = read_fragment(results_dir, "generations", _gkey(job), columns=["repeat"])
                covered = max(r["repeat"] for r in present) + 1
                if all(has_fragment(results_dir, "judgments", _jkey(job, j)) for j in _applicable(judges, suite)):
                    continue  # a resumed run reads no more of a finished pair than its repeats
                jobs.append(job)
                start_judges(job, read_fragment(results_dir, "generations", _gkey(job)))
            if covered >= repeats:
                continue
            job = _Job(trial_id, step, suite, target, covered)
            jobs.append(job)
            prompts = [encode_for(job)(it["prompt"]) for it in suite.items]
            parts = [((r, i), prompts[i:i + chunk], repeat_sampling(sampling, r))
                     for r in range(covered, repeats) for i in range(0, len(prompts), chunk)]
            job.expected = len(parts)
            if not parts:
                write_generations(job)
            planned.setdefault(target.model, []).extend((job, *p) for p in parts)
            outstanding[target.model] = outstanding.get(target.model, 0) + len(parts)
    held = [m for m in planned if planned[m]]
    for model in held[:models_in_flight or len(held)]:
        release(model)
    held = held[models_in_flight or len(held):]
    log(f"evaluate: {len(jobs)} (checkpoint, suite) pair(s) to do, {len(models) * len(suites) - len(jobs)} "
        f"already done; {repeats} repeat(s) each, judges {', '.join(j.name for j in judges)}")
    errors: list[BaseException] = []
    total = sum(job.expected for job in jobs)  # generation requests of this run, queued ones included
    last_status = time.perf_counter()
    while handlers:
        ready, _ = wait(list(handlers), timeout=status_every_s or None, return_when=FIRST_COMPLETED)
        if status_every_s and time.perf_counter() - last_status >= status_every_s:
            last_status = time.perf_counter()
            log(_status_line(answered[0], total, finished[0], len(jobs), last_status - start))
        for fut in ready:
            handler = handlers.pop(fut)
            if fut.exception() is not None:
                errors.append(fut.exception())  # type: ignore[arg-type]
            else:
                handler(fut.result())
    if errors:
        # everything that did succeed is written by now; a rerun picks up from there
        log(f"evaluate: {len(errors)} request(s) failed for good; rerun with --resume to finish")
        raise errors[0]
    return len(jobs)


def _status_line(answered: int, total: int, judged: int, pairs: int, spent: float) -> str:
    eta = f", ~{spent / answered * (total - answered):.0f} s of generation to go" if answered and total else ""
    return (f"evaluate: status: {answered}/{total} generation requests answered, {judged}/{pairs} (checkpoint, "
            f"suite) pairs judged; {spent:.0f} s so far{eta}")


def item_kind(suite_kind: str, item: dict) -> str:
    """What a refusal of this item means, from its own expected behaviour where the suite gives one: a mixed
    suite (XSTest's safe and unsafe prompts, JailbreakBench's harmful and benign behaviours) yields harmful
    rows and over-refusal rows from its own items."""
    expected = item.get("expected")
    if expected == "refuse":
        return "harmful"
    if expected == "comply" and suite_kind == "harmful":
        return "overrefusal"
    return suite_kind


def _key(job: _Job, item: dict, repeat: int) -> dict[str, Any]:
    return {"trial_id": job.trial_id, "step": job.step, "suite": job.suite.name,
            "suite_kind": item_kind(job.suite.kind, item), "prompt_id": str(item["id"]), "repeat": repeat}


def _applicable(judges: list[Judge], suite: Suite) -> list[Judge]:
    kinds = {item_kind(suite.kind, it) for it in suite.items} or {suite.kind}
    return [j for j in judges if any(judges_kind(j, k) for k in kinds)]


def _judge_row(item: dict, generation: dict[str, Any], encode: Encode) -> dict[str, Any]:
    """What judges see of one response: the plain request (before any jailbreak wrapper), the prompt ids the
    model was fed, the response and the ids the model generated, and HarmBench's behaviour / context where the
    suite has them."""
    request = item.get("request", generation["prompt"])
    return {"request": request, "prompt_ids": encode(generation["prompt"]), "response": generation["response"],
            "response_ids": generation["response_ids"], "behavior": item.get("behavior", request),
            "context": item.get("context", "")}


def _gkey(job: _Job) -> str:
    return fragment_key(job.trial_id, job.step, job.suite.name, job.first_repeat)


def _jkey(job: _Job, judge: Judge) -> str:
    return f"{_gkey(job)}__{judge.name}"


def _bind(fn: Callable[[_Job, Judge, list[int], Any], None], job: _Job, judge: Judge,
          mine: list[int]) -> Callable[[Any], None]:
    return lambda out: fn(job, judge, mine, out)
