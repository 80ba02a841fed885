"""``capsafe evaluate RESULTS_DIR [overrides]``: add judges, judge-prompt variants or suites to a finished run's
checkpoints without retraining. Only the missing (checkpoint, suite, judge) keys are computed: existing
generations are reused by new judges, a new suite is generated and judged; the report is rewritten, and the
results' spec snapshot is replaced by the extended spec, with the change recorded in ``extensions.jsonl``.

What would make old and new rows disagree is refused (a changed generation setting, a changed existing judge or
suite, fewer judges): those need a new run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from capsafe.common.data import read_jsonl
from capsafe.common.provenance import write_manifest
from capsafe.common.run_guard import run_lock
from capsafe.errors import SpecError
from capsafe.evaluate.stage import run_evaluation
from capsafe.preflight import check_eval_context
from capsafe.report.build import write_report
from capsafe.run_inputs import answer_labeller, check_judge_files, load_suites, resolve_paths
from capsafe.runtime.capacity import check_cluster, local_cpus
from capsafe.runtime.ray_shell import ray_session
from capsafe.spec import Spec, load_spec

SPEC_SNAPSHOT = "spec.json"
HISTORY = "extensions.jsonl"
# eval fields about how the pool runs, not what it generates: free to change
SERVING = {"replicas", "cpus_per_replica", "gpus_per_replica", "max_models_per_replica", "spare_engines",
           "swap_weights", "autoscaling", "max_ongoing_requests", "request_retries", "max_model_len", "schedule",
           "http", "status_every_s"}
ADDABLE = {"judges", "llm_judges", "suites", "repeats"}


def extension_problems(old: Spec, new: Spec) -> list[str]:
    """Why ``new`` cannot extend a run made with ``old`` (empty: it can)."""
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")
    problems = [f"'{key}' differs" for key in sorted(set(a) | set(b))
                if key not in ("eval", "output_dir", "experiment") and a.get(key) != b.get(key)]
    ea, eb = a["eval"], b["eval"]
    problems += [f"eval.{key} differs (it changes what is generated or how an existing judge labels)"
                 for key in sorted(set(ea) | set(eb)) if key not in SERVING | ADDABLE and ea.get(key) != eb.get(key)]
    if eb["repeats"] < ea["repeats"]:
        problems.append(f"eval.repeats can only grow (the run has {ea['repeats']}; more are generated for every "
                        "checkpoint and suite with the next seeds, the existing ones kept)")
    if eb["judges"][:len(ea["judges"])] != ea["judges"]:
        problems.append(f"eval.judges must keep {ea['judges']} first and only add")
    for field, key in (("suites", "name"), ("llm_judges", "name")):
        new_items = {item[key]: item for item in eb[field]}
        for item in ea[field]:
            now = new_items.get(item[key])
            if now is None:
                problems.append(f"eval.{field}: '{item[key]}' is gone (the run has its results; keep it)")
            elif field == "llm_judges" and now["prompt_variants"][:len(item["prompt_variants"])] == \
                    item["prompt_variants"] and {**now, "prompt_variants": []} == {**item, "prompt_variants": []}:
                continue  # the same judge, with prompt variants added
            elif now != item:
                problems.append(f"eval.{field}: '{item[key]}' changed (add a new one under another name)")
    return problems


def _materialized(paths: dict[str, str], data_dir: Path) -> dict[str, str]:
    """The task files as the run wrote them under ``data/`` (what it trained and measured on)."""
    out = dict(paths)
    for field in ("task.train_file", "task.eval_file", "task.confirm_file"):
        path = data_dir / f"{field.split('.')[1].removesuffix('_file')}.jsonl"
        if path.is_file():
            out[field] = str(path.resolve())
    return out


def evaluate_existing(results_dir: Path, overrides: list[str], log: Callable[[str], None]) -> str:
    """Extend the finished run in ``results_dir`` with ``overrides`` (eval.judges, eval.llm_judges, eval.suites,
    more eval.repeats, and the pool's settings); return the report text."""
    snapshot = results_dir / SPEC_SNAPSHOT
    if not snapshot.is_file():
        raise SpecError(f"{results_dir} holds no {SPEC_SNAPSHOT}; pass a folder written by capsafe run, e.g. "
                        "results/demo")
    place = [f"output_dir={results_dir.parent}", f"experiment={results_dir.name}"]
    old = load_spec(snapshot, place, check_files=False)
    spec = load_spec(snapshot, [*place, *overrides])
    problems = extension_problems(old, spec)
    if problems:
        raise SpecError("capsafe evaluate adds judges, judge-prompt variants, suites and repeats to a run, and "
                        "changes how "
                        "its pool runs; these overrides would change what the run's existing rows mean: "
                        + "; ".join(problems) + ". Start a new run for them (another experiment name).")
    paths = _materialized(resolve_paths(spec, log), results_dir / "data")
    suites = load_suites(spec, paths)
    check_judge_files(spec, paths)
    selection = read_jsonl(paths["task.eval_file"], ("prompt", "answer"))[: spec.task.eval_size]
    context_len = check_eval_context(spec, paths, selection, suites, log)
    with run_lock(results_dir, log), ray_session(spec.ray_address, local_cpus(spec, False)):
        check_cluster(spec, log, False)
        log(f"evaluate: extending {results_dir} ({' '.join(overrides) or 'nothing new'}); only missing results "
            "are computed")
        write_manifest(results_dir, spec.model_dump(mode="json"), paths, "evaluate")
        run_evaluation(spec, paths, results_dir, suites, log, context_len, answer_labeller(spec))
        record(results_dir, old, spec, overrides)
    return write_report(results_dir, spec.experiment)


def record(results_dir: Path, old: Spec, new: Spec, overrides: list[str]) -> None:
    """The extended spec becomes the snapshot (what --resume and later extensions compare with); the change is
    appended to the history."""
    before = {j.name: j for j in old.eval.llm_judges}
    entry: dict[str, Any] = {"at": datetime.now(UTC).isoformat(), "overrides": overrides,
                             "judges": [j for j in new.eval.judges if j not in old.eval.judges],
                             "llm_judges": [j.name for j in new.eval.llm_judges if before.get(j.name) != j],
                             "suites": [s.name for s in new.eval.suites
                                        if s.name not in {o.name for o in old.eval.suites}],
                             "repeats": list(range(old.eval.repeats, new.eval.repeats))}
    with (results_dir / HISTORY).open("a") as fh:
        fh.write(json.dumps(entry) + "\n")
    snapshot = results_dir / SPEC_SNAPSHOT
    where = {k: v for k, v in json.loads(snapshot.read_text()).items() if k in ("output_dir", "experiment")}
    tmp = results_dir / f".{SPEC_SNAPSHOT}.tmp"
    # the run's own output_dir / experiment kept, so 'capsafe run --resume' with the extended spec matches it
    tmp.write_text(json.dumps({**new.model_dump(mode="json"), **where}, sort_keys=True, indent=1))
    tmp.replace(snapshot)
