"""Safety evaluation driver logic: fan (model x suite) requests out to a generation pool, judge every
response, and write one generations and one judgments fragment per (trial, checkpoint step, suite).

``submit`` is whatever starts a generation request and returns an object with ``.result()`` (a Serve
``DeploymentResponse`` in production, a finished future in tests), so this module never imports Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsafe.judges import Judge
from capsafe.results import has_fragment, write_table


@dataclass(frozen=True)
class Suite:
    name: str
    kind: str  # harmful | overrefusal | benign
    items: list[dict]  # each with 'id' and 'prompt'


def fragment_key(trial_id: str, step: int, suite: str) -> str:
    return f"{trial_id}__step{step}__{suite}"


def evaluate_models(models: dict[tuple[str, int], str], suites: list[Suite], render: Callable[[str], str],
                    max_new_tokens: int,
                    submit: Callable[[str, list[str], int], Any], judges: list[Judge], engine_name: str,
                    results_dir: Path, log: Callable[[str], None], chunk: int = 64) -> int:
    """Generate and judge every (checkpoint, suite) not already in the results; return how many were done.

    ``models`` maps (trial id, step) to the model directory to load; ``render`` turns a request into the
    model's input text.

    Each model's first request goes out alone and the rest follow once it has answered: by then one replica
    has that model's engine loaded, so the pool routes the rest there instead of loading it everywhere.
    Different models still load in parallel on different replicas.
    """
    pending: list[tuple[tuple[str, int], Suite, list[Any]]] = []
    work: dict[str, list[tuple[int, list[str]]]] = {}  # model -> [(index in pending, prompts chunk)]
    for (trial_id, step), model_dir in models.items():
        for suite in suites:
            key = fragment_key(trial_id, step, suite.name)
            if has_fragment(results_dir, "generations", key) and has_fragment(results_dir, "judgments", key):
                continue
            prompts = [render(it["prompt"]) for it in suite.items]
            pending.append(((trial_id, step), suite, []))
            work.setdefault(model_dir, []).extend(
                (len(pending) - 1, prompts[i:i + chunk]) for i in range(0, len(prompts), chunk))
    first = {m: submit(m, jobs[0][1], max_new_tokens) for m, jobs in work.items()}
    for model_dir, jobs in work.items():
        first[model_dir].result()  # the engine is loaded on some replica now
        for n, (index, prompts_chunk) in enumerate(jobs):
            pending[index][2].append(first[model_dir] if n == 0 else submit(model_dir, prompts_chunk, max_new_tokens))
    total = len(pending)
    log(f"evaluate: {total} (model, suite) pair(s) sent to the pool, {len(models) * len(suites) - total} "
        "already done")
    for done, ((trial_id, step), suite, parts) in enumerate(pending, 1):
        responses = [text for part in parts for text in part.result()]
        gens, verdicts = [], []
        for item, response in zip(suite.items, responses, strict=True):
            gens.append({"trial_id": trial_id, "step": step, "suite": suite.name, "suite_kind": suite.kind,
                         "prompt_id": str(item["id"]),
                         "prompt": item["prompt"], "response": response, "engine": engine_name})
            for judge in judges:
                verdicts.append({"trial_id": trial_id, "step": step, "suite": suite.name, "suite_kind": suite.kind,
                                 "prompt_id": str(item["id"]),
                                 "judge": judge.name, "verdict": judge(item["prompt"], response)})
        key = fragment_key(trial_id, step, suite.name)
        # judgments last: a pair counts as done only when both fragments exist
        write_table(results_dir, "generations", gens, fragment=key)
        write_table(results_dir, "judgments", verdicts, fragment=key)
        log(f"evaluate: [{done}/{total}] {trial_id} step {step} on {suite.name}: {len(responses)} responses judged")
    return total
