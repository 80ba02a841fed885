"""Everything a run reads, resolved before anything starts: the demo world's files, the capability task's
data (any format, materialised as jsonl in the results folder), and the safety suites."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from capsafe.common.data import Suite, read_check_file, read_jsonl
from capsafe.errors import DataError
from capsafe.inputs.jailbreaks import wrap
from capsafe.inputs.suites import load_suite_items
from capsafe.inputs.task_data import load_task_records, write_jsonl
from capsafe.runtime.ray_shell import cache_root
from capsafe.spec import DEMO, Spec


def resolve_paths(spec: Spec, log: Callable[[str], None]) -> dict[str, str]:
    """Spec data fields -> real paths, building (or reusing) the demo world where a field says 'demo'."""
    paths = spec.data_paths()
    if not spec.uses_demo_world():
        return paths
    from capsafe.world import build_world

    world = build_world(spec.world, cache_root() / "worlds", log=log)
    demo = {"model.path": world.model_dir, "task.train_file": world.task_train, "task.eval_file": world.task_eval,
            "task.confirm_file": world.task_confirm, "task.general_file": world.general}
    resolved = {}
    for field, value in paths.items():
        if value != DEMO:
            resolved[field] = value
        elif field in demo:
            resolved[field] = str(demo[field])
        elif field.startswith("eval.llm_judges."):
            from capsafe.world.judge import CHECK_FILE, build_judge

            judge = build_judge(world, spec.world, log)
            resolved[field] = str(judge / CHECK_FILE if field.endswith(".check_file") else judge)
        elif field.endswith((".data_file", ".prompts_file")):
            resolved[field] = str(world.safety)
        elif field.endswith(".unaligned_model"):
            from capsafe.world.unaligned import build_unaligned

            resolved[field] = str(build_unaligned(world, spec.world, log))
        else:  # eval.suites.<i>.file
            name = spec.eval.suites[int(field.split(".")[2])].name
            resolved[field] = str(world.suites[name])
    return resolved


def answer_labeller(spec: Spec) -> Callable[[str], tuple[str, bool] | None] | None:
    """The demo world's ground truth for an answer (``capsafe.world.truth``) when the run's answers are the
    world's models' (model.path demo) and LLM judges label them; None otherwise."""
    if spec.model.path != DEMO or not spec.eval.llm_judges:
        return None
    from capsafe.world.truth import world_truth

    return world_truth


def check_judge_files(spec: Spec, paths: dict[str, str]) -> None:
    """Read every LLM judge's check file once, so a malformed one fails before anything runs."""
    for i, j in enumerate(spec.eval.llm_judges):
        if j.check_file is not None:
            read_check_file(paths[f"eval.llm_judges.{i}.check_file"])


def load_task(spec: Spec, paths: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """The task's train, selection ('task.eval_file') and confirmation records ('prompt', 'answer') read through
    the spec's field mapping, by the spec field they stand for; with ``task.selection_from_train`` the selection
    records are the last ones of the training data, which training then never sees. Raises DataError before
    anything is written."""
    t = spec.task

    def read(field: str, split: str, limit: int | None) -> list[dict[str, str]]:
        return load_task_records(paths[field], split, t.prompt_field, t.answer_field, t.choices_field, limit)

    records = {"task.train_file": read("task.train_file", t.train_split, None)}
    if t.selection_from_train is not None:
        train = records["task.train_file"]
        if len(train) <= t.selection_from_train:
            raise DataError(f"task.selection_from_train is {t.selection_from_train} but the training data has only "
                            f"{len(train)} records; lower it so that some remain to train on.")
        records["task.train_file"] = train[:-t.selection_from_train]
        records["task.eval_file"] = train[-t.selection_from_train:][: t.eval_size]
    else:
        records["task.eval_file"] = read("task.eval_file", t.eval_split, t.eval_size)
    if t.confirm_file is not None:
        records["task.confirm_file"] = read("task.confirm_file", t.confirm_split, t.confirm_size)
    return records


def materialize_task(records: dict[str, list[dict[str, str]]], paths: dict[str, str],
                     data_dir: Path) -> dict[str, str]:
    """Write the task records as jsonl under ``data_dir``, the one form training workers read; return paths
    updated to point there. Done once by the driver: workers never need hub access, and the results folder
    records exactly what was trained and evaluated on."""
    out = dict(paths)
    for field, rows in records.items():
        target = data_dir / f"{field.split('.')[1].removesuffix('_file')}.jsonl"
        write_jsonl(target, rows)
        out[field] = str(target.resolve())
    return out


def prepare_methods(spec: Spec, paths: dict[str, str], data_dir: Path) -> dict[str, str]:
    """Each method's inputs turned into what its workers read (``MethodSpec.prepare``); paths updated."""
    out = dict(paths)
    for i, method in enumerate(spec.methods):
        mine = {name: paths[f"methods.{i}.{name}"] for name in method.data_fields()}
        for name, path in method.prepare(mine, data_dir).items():
            out[f"methods.{i}.{name}"] = path
    return out


def load_suites(spec: Spec, paths: dict[str, str]) -> list[Suite]:
    """Every suite of the spec, read in its format and cut to ``eval.max_prompts_per_suite``."""
    suites = []
    for i, s in enumerate(spec.eval.suites):
        path = paths[f"eval.suites.{i}.file"]
        items: list[dict]
        if s.format == "jsonl":
            items = read_jsonl(path, ("prompt",))
            for n, it in enumerate(items):
                it.setdefault("id", f"{s.name}-{n}")
        else:
            items = load_suite_items(s.format, path, s.split, s.prompt_field, s.id_field)
        if s.only:
            items = [it for it in items if it.get("expected", "refuse") == s.only]
        if not items:
            raise DataError(f"suite '{s.name}' ({path}) has no items{' with expected ' + s.only if s.only else ''}; "
                            "check eval.suites file, format and only.")
        items = items[: spec.eval.max_prompts_per_suite]
        if s.jailbreak:
            # judges see the plain request ('request'), the model the wrapped one
            items = [{**it, "request": it["prompt"], "prompt": wrap(s.jailbreak, it["prompt"])} for it in items]
        suites.append(Suite(s.name, s.kind, items))
    return suites
