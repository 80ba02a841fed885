"""capsafe's command line: validate, run, submit, report, evaluate, compare. User mistakes exit 2 with a
one-paragraph fix."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from capsafe.errors import CapsafeError

REPO_ROOT = Path(__file__).resolve().parent.parent
# Kept out of the working_dir uploaded with a Ray job: environments, caches and results.
JOB_EXCLUDES = [".venv", "results", ".git", "**/__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache",
                "*.egg-info"]


# A spec submitted from outside the project travels to the job in this variable (``env:NAME`` as the spec).
SUBMITTED_SPEC = "CAPSAFE_SUBMITTED_SPEC"


def spec_file(arg: str) -> str:
    """The spec argument as a file path: ``env:NAME`` (a spec ``capsafe submit`` sent from outside the project)
    is written to a temporary file first."""
    if not arg.startswith("env:"):
        return arg
    text = os.environ.get(arg[4:])
    if text is None:
        raise CapsafeError(f"spec {arg}: no variable {arg[4:]} in this environment; pass a spec file, e.g. "
                           "jobs/demo.yaml")
    path = Path(tempfile.mkdtemp(prefix="capsafe-spec-")) / "submitted.yaml"
    path.write_text(text)
    return str(path)


def _cmd_validate(args: argparse.Namespace) -> int:
    from capsafe.spec import load_spec
    from capsafe.train.trials import plan_trials

    spec = load_spec(spec_file(args.spec), args.overrides)
    paths = spec.data_paths()
    if spec.task.selection_from_train is not None:  # carved off the training data when the run starts
        paths["task.eval_file"] = paths["task.train_file"]
    n = len(plan_trials(spec, paths, spec.results_dir / "models"))
    ladder = f" (ladder {spec.task.levels()})" if spec.task.ladder else ""
    print(f"{args.spec}: valid. {n} trial(s) ({len(spec.methods)} method(s) x {len(spec.seeds)} seed(s) x "
          f"{len(spec.train.learning_rates)} learning rate(s)), target {spec.task.metric} >= {spec.task.target}"
          f"{ladder}, "
          f"{len(spec.eval.suites)} suite(s), results in {spec.results_dir}/")
    from capsafe.report.verdicts import plan_floor

    for line in plan_floor(spec)[1]:  # what the plan's tests can show at all, before anything trains
        print(line)
    address = getattr(args, "address", None)
    if getattr(args, "plan", False) or address:
        from capsafe.pipeline import console_logger
        from capsafe.plan import plan

        print("\n".join(plan(spec, address, console_logger())), flush=True)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from capsafe.pipeline import run_experiment, unfinished_note
    from capsafe.spec import load_spec

    spec = load_spec(spec_file(args.spec), args.overrides)
    spec_path = " ".join([args.spec, *map(shlex.quote, args.overrides)])
    print(run_experiment(spec, resume=args.resume, overwrite=args.overwrite, spec_path=spec_path))
    from capsafe.report.build import console_summary

    print(console_summary(spec.results_dir), flush=True)
    if spec.results_url:
        print(f"(results on object storage: {spec.results_url}; the paths above are this machine's working copy)",
              flush=True)
    note = unfinished_note(spec, spec_path)  # a sweep stopped by Ctrl-C ends here, its report partial
    if note:
        print(f"capsafe: {note}", flush=True)
    return 0


def results_folder(arg: str) -> Path:
    """A RESULTS argument as a local folder: itself, or for object storage (s3://, gs://) its working copy, brought
    up to date first (the tables, spec and report; model checkpoints stay remote until a pool loads them)."""
    from capsafe.common.storage import holds_anything, is_url, pull

    if not is_url(arg):
        return Path(arg)
    if not holds_anything(arg):
        raise CapsafeError(f"'{arg}' holds nothing; pass the <output_dir>/<experiment> URL of a run")
    return pull(arg)


def _cmd_report(args: argparse.Namespace) -> int:
    from capsafe.common.storage import push
    from capsafe.report.build import write_report

    results = results_folder(args.results)
    if not (results / "trials").is_dir():
        raise CapsafeError(f"'{args.results}' holds no trials table; pass a folder written by capsafe run, "
                           "e.g. results/demo.")
    print(write_report(results, results.name))
    push(results)  # object storage: the report goes up beside the tables
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from capsafe.report.compare import compare_runs

    text = compare_runs([results_folder(r) for r in args.results])
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text)
        tmp.replace(out)
    print(text, end="")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from capsafe.common.storage import push
    from capsafe.extend import evaluate_existing
    from capsafe.pipeline import console_logger

    results = results_folder(args.results)
    print(evaluate_existing(results, args.overrides, console_logger()))
    push(results)  # object storage: the new judgments went up as written; the report and spec snapshot now
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from capsafe.spec import load_spec

    spec = load_spec(args.spec, args.overrides)  # fail here, before anything reaches the cluster
    spec_path = Path(args.spec).resolve()
    inside = spec_path.is_relative_to(REPO_ROOT)
    if not inside:
        # The job runs in the uploaded project folder: the spec travels in the job's environment instead, and a
        # relative path in it would be read from the project folder on the cluster, not from the spec's.
        relative = [f"{field}={value}" for field, value in spec.data_paths().items()
                    if not Path(value).is_absolute() and Path(value).exists()]
        if relative:
            raise CapsafeError(f"{args.spec} lies outside the project, so its relative paths ({', '.join(relative)}) "
                               "would be read from the project folder on the cluster; make them absolute paths "
                               "every node sees (e.g. under /mnt/shared), or move the spec into the project.")
    from ray.job_submission import JobStatus, JobSubmissionClient

    from capsafe.runtime.ray_shell import worker_env

    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise CapsafeError("no cluster to submit to: pass --address http://HEAD:8265 or set RAY_ADDRESS (as "
                           "'ray job submit' reads it)")
    runtime_env = job_runtime_env(args.runtime_env, args.env, worker_env())
    if inside:
        spec_arg = str(spec_path.relative_to(REPO_ROOT))
    else:
        runtime_env["env_vars"][SUBMITTED_SPEC] = spec_path.read_text()
        spec_arg = f"env:{SUBMITTED_SPEC}"
    entry = " ".join(["python -m capsafe.cli run", *(["--resume"] if args.resume else []),
                      *(["--overwrite"] if args.overwrite else []),
                      shlex.quote(spec_arg), *map(shlex.quote, args.overrides)])
    try:
        client = JobSubmissionClient(address)
    except Exception as exc:
        raise CapsafeError(f"cannot reach a Ray cluster's job API at {address} ({exc}); pass the head's "
                           "dashboard address, e.g. --address http://127.0.0.1:8265.") from None
    job_id = client.submit_job(entrypoint=entry, runtime_env=runtime_env)
    carried = "" if inside else f" (the spec {args.spec} travels in the job's environment as {SUBMITTED_SPEC})"
    print(f"submitted job {job_id}: {entry}{carried}", flush=True)
    if args.no_wait:
        return 0
    status = follow_job(client, job_id)
    print(f"job {job_id}: {status.value}")
    return 0 if status == JobStatus.SUCCEEDED else 1


def job_runtime_env(path: str | None, names: list[str], base_env: dict[str, str]) -> dict[str, Any]:
    """The job's runtime environment: the project as its working_dir, capsafe's worker variables, what a
    ``--runtime-env`` YAML/JSON file adds (pip packages, env_vars, ...; its own working_dir is refused: the job
    runs this project) and the variables ``--env NAME`` names, with this shell's values (never in a spec)."""
    import yaml

    extra: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise CapsafeError(f"--runtime-env {path}: cannot read it ({exc}); give a YAML or JSON file") from None
        if not isinstance(loaded, dict):
            raise CapsafeError(f"--runtime-env {path}: a mapping of Ray runtime_env fields is needed (pip, "
                               "env_vars, ...)")
        if "working_dir" in loaded:
            raise CapsafeError(f"--runtime-env {path}: working_dir is set by capsafe (the project); drop it")
        extra = dict(loaded)
    env = {**base_env, **dict(extra.pop("env_vars", None) or {})}
    excludes = [*JOB_EXCLUDES, *list(extra.pop("excludes", None) or [])]
    for name in names:
        if name not in os.environ:
            raise CapsafeError(f"--env {name}: that variable is not set in this shell; export it first (its value "
                               "goes to the job's environment, never into a spec)")
        env[name] = os.environ[name]
    return {**extra, "working_dir": str(REPO_ROOT), "excludes": excludes, "env_vars": env}


def follow_job(client: Any, job_id: str, poll_s: float = 1.0) -> Any:
    """Print the job's log as it grows, through Ray's tail API (the dashboard streams new lines; fetching the
    whole log every few seconds costs more the longer the job runs), and return its final status."""
    import asyncio

    from ray.job_submission import JobStatus

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())  # ends when the job's log is closed, i.e. when the job has ended
    terminal = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)
    while (status := client.get_job_status(job_id)) not in terminal:
        time.sleep(poll_s)  # the log can close a moment before the status is final
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capsafe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in [("validate", "check a spec and print what it would run (--plan: read its inputs and "
                             "bound what it would spend)"),
                           ("run", "run an experiment on an embedded local Ray cluster (or ray_address)"),
                           ("submit", "submit the run as a Ray job to an existing cluster")]:
        p = sub.add_parser(name, help=helptext)
        p.add_argument("spec", help="experiment YAML, e.g. jobs/demo.yaml")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. task.target=0.5 seeds=[0,1]")
        if name in ("run", "submit"):
            p.add_argument("--resume", action="store_true", help="continue the experiment's earlier run in its "
                           "results folder: skip finished trials, restart unfinished ones from their last "
                           "checkpoint, evaluate only what is missing")
            p.add_argument("--overwrite", action="store_true", help="delete an earlier run's results in the "
                           "experiment's folder and start over (without it a run never replaces results)")
        if name == "validate":
            p.add_argument("--plan", action="store_true", help="also read every input as the run would (hub ids "
                           "fetched, the demo world built) and print their sizes and token lengths, the context "
                           "checks, the resources the run holds and an upper bound on its GPU-hours; nothing is "
                           "written or trained")
            p.add_argument("--address", help="with --plan: check the run's resources against this running Ray "
                           "cluster (its GCS address, e.g. 10.0.0.1:6379, as the spec's ray_address)")
        if name == "submit":
            p.add_argument("--address", help="the cluster's job API, e.g. http://127.0.0.1:8265 (default: "
                           "$RAY_ADDRESS, as ray job submit reads it)")
            p.add_argument("--runtime-env", help="a YAML or JSON file of Ray runtime_env fields to add (pip "
                           "packages, env_vars, ...)")
            p.add_argument("--env", action="append", default=[], metavar="NAME", help="pass this shell's "
                           "variable NAME to the job (e.g. --env HF_TOKEN); repeatable")
            p.add_argument("--no-wait", action="store_true", help="return after submitting")
    p = sub.add_parser("report", help="rewrite report.md from a results folder")
    p.add_argument("results", help="e.g. results/demo")
    p = sub.add_parser("compare", help="several runs side by side: per-method results, matched comparisons, "
                       "and the settings that differ")
    p.add_argument("results", nargs="+", help="two or more results folders, e.g. results/a results/b")
    p.add_argument("--out", help="also write the Markdown to this file")
    p = sub.add_parser("evaluate", help="add judges, judge-prompt variants or suites to a finished run's "
                       "checkpoints (no retraining; only missing results are computed)")
    p.add_argument("results", help="the run's results folder, e.g. results/demo")
    p.add_argument("overrides", nargs="*", help="eval.* overrides, e.g. \"eval.llm_judges=[{name: guard}]\"")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow options (submit SPEC --address URL key=value); argparse leaves those unparsed.
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    handler = {"validate": _cmd_validate, "run": _cmd_run, "submit": _cmd_submit, "report": _cmd_report,
               "evaluate": _cmd_evaluate, "compare": _cmd_compare}
    try:
        return handler[args.command](args)
    except CapsafeError as exc:
        print(f"capsafe: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"capsafe: interrupted. {_continue_hint(args)}", file=sys.stderr)
        return 130
    except BaseException as exc:
        full = disk_full(exc)
        if full is None:
            raise
        print(f"capsafe: error: {full} {_continue_hint(args)}", file=sys.stderr)
        return 2


def _continue_hint(args: argparse.Namespace) -> str:
    """How to go on after a run stopped early: what was written is kept, --resume continues."""
    if args.command == "evaluate":
        return ("The results written so far are kept; continue with: capsafe evaluate "
                + " ".join([args.results, *map(shlex.quote, args.overrides)]))
    if args.command not in ("run", "submit"):
        return "Nothing was changed."
    words = ["capsafe", args.command, "--resume", args.spec, *map(shlex.quote, args.overrides)]
    if args.command == "submit":
        words[3:3] = ["--address", args.address] if args.address else []
    return f"The results written so far are kept; continue with: {' '.join(words)}"


def disk_full(exc: BaseException) -> str | None:
    """One sentence when ``exc`` (or what it wraps: Ray passes a worker's error on as text) is a full disk."""
    import errno

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            where = seen.filename or "the results folder"
            return f"the disk is full (no space left writing {where}); free space there."
        if "No space left on device" in str(seen):
            return "the disk is full (a worker could not write: No space left on device); free space on the " \
                   "results folder's disk."
        seen = seen.__cause__ or seen.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
