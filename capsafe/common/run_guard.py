"""What keeps a run's results safe: an existing run is never replaced without ``--overwrite``, one live run per
results folder (a lock file, recovered when its process is gone), and damaged fragments found before a resume
or a report uses them (moved aside, never deleted). Pure Python and pyarrow."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq

from capsafe.common.fragment_keys import dependents, mismatched_fragments
from capsafe.common.results import OPTIONAL_COLUMNS, SCHEMAS
from capsafe.common.storage import delete, holds_anything, join, read_text, remote_of, write_text
from capsafe.errors import CapsafeError, SpecError

LOCK_FILE = ".capsafe.lock"
DAMAGED_DIR = "damaged"


class ResultsError(CapsafeError):
    """A results folder that cannot be used as asked (another run holds it, a fragment is damaged)."""


def holds_results(results_dir: Path) -> bool:
    """Whether the folder holds anything a run wrote (a lock alone does not count)."""
    return results_dir.is_dir() and any(p.name != LOCK_FILE for p in results_dir.iterdir())


def refuse_to_replace(results_dir: Path, experiment: str, spec_path: str | None, url: str | None = None) -> None:
    """A new run of an experiment whose folder (or object storage ``url``) holds results is refused, with the
    choices named."""
    where = url if url and holds_anything(url) else results_dir if holds_results(results_dir) else None
    if where is None:
        return
    spec = spec_path or "SPEC"
    raise SpecError(f"{where} holds the results of an earlier run of '{experiment}', and a new run would "
                    f"replace them; nothing was changed. Continue that run with 'capsafe run --resume {spec}' (same "
                    "spec and overrides), keep it and start another with experiment=<new name> or "
                    "output_dir=<folder>, or delete it and start over with --overwrite.")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def run_lock(results_dir: Path, log: object = None, url: str | None = None) -> Iterator[Path]:
    """Hold ``results_dir/.capsafe.lock`` while a run uses the folder: a second live run on it is refused; a lock
    whose process is gone (same host) is recovered. The folder is created if needed and removed again on exit
    if the run left nothing else in it. With object storage (``url``, or the URL the folder is a working copy of)
    the lock is also an object there, so a run from another machine is refused too: checked, then written (an
    object store offers no exclusive create through pyarrow: two runs started within the same second can both
    pass)."""
    url = url or remote_of(results_dir)
    created = not results_dir.exists()
    results_dir.mkdir(parents=True, exist_ok=True)
    lock = results_dir / LOCK_FILE
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now(UTC).isoformat()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            if holder and holder.get("host") == mine["host"] and not _alive(int(holder.get("pid", -1))):
                lock.unlink(missing_ok=True)  # a run that died without releasing it
                if callable(log):
                    log(f"results: recovered the lock of run pid {holder.get('pid')} (no longer running)")
                continue
            who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}" if holder
                   else "unknown")
            raise ResultsError(f"another capsafe run ({who}) is using {results_dir}; wait for it to end or stop it "
                               f"(if it is gone, delete {lock})") from None
        with os.fdopen(fd, "w") as fh:
            json.dump(mine, fh)
        break
    remote = join(url, LOCK_FILE) if url else None
    try:
        if remote:
            _take_remote(remote, mine, log)
        yield lock
    finally:
        if remote and _holder_text(read_text(remote)) == mine:
            delete(remote)
        lock.unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):
                results_dir.rmdir()  # only if the run wrote nothing


def _take_remote(remote: str, mine: dict, log: object) -> None:
    """Write the run's lock object unless a live run holds one (a dead one on this host is taken over)."""
    holder = _holder_text(read_text(remote))
    if holder:
        if holder.get("host") == mine["host"] and not _alive(int(holder.get("pid", -1))):
            if callable(log):
                log(f"results: recovered the lock of run pid {holder.get('pid')} in {remote} (no longer running)")
        else:
            raise ResultsError(f"another capsafe run (pid {holder.get('pid')} on {holder.get('host')}, started "
                               f"{holder.get('started')}) is using {remote.rsplit('/', 1)[0]}; wait for it to end or "
                               f"stop it (if it is gone, delete the object {remote})")
    write_text(remote, json.dumps(mine))


def _holder_text(text: str | None) -> dict | None:
    try:
        return dict(json.loads(text)) if text else None
    except (ValueError, TypeError):
        return None


def _holder(lock: Path) -> dict | None:
    try:
        return dict(json.loads(lock.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def damaged_fragments(results_dir: Path) -> list[tuple[Path, str]]:
    """Every fragment of every table that cannot be read whole, or whose rows are not those of its key: (path,
    why). Footers of all; the key columns of the evaluation tables (capsafe.common.fragment_keys)."""
    bad = []
    for name, schema in SCHEMAS.items():
        folder = results_dir / name
        for path in sorted(folder.glob("*.parquet")) if folder.is_dir() else []:
            try:
                meta = pq.ParquetFile(path).metadata
                names = pq.ParquetFile(path).schema_arrow.names
            except Exception as exc:  # noqa: BLE001 - whatever pyarrow says, the file is unusable
                bad.append((path, f"{type(exc).__name__}: {str(exc)[:120]}"))
                continue
            if not set(names) <= set(schema.names) or set(schema.names) - set(names) - OPTIONAL_COLUMNS:
                bad.append((path, f"columns {sorted(names)} are not the {name} table's"))
            elif meta.num_rows == 0:
                bad.append((path, "no rows"))
    return bad + mismatched_fragments(results_dir, {path for path, _ in bad})


def move_aside(results_dir: Path, damaged: list[tuple[Path, str]]) -> Path:
    """Move damaged fragments under ``results_dir/damaged/<time>/<table>/`` (never deleted), with a note of why;
    with a damaged generations fragment the judgments of its answers go too (they are judged again)."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = results_dir / DAMAGED_DIR / stamp
    paths = [path for path, _ in damaged]
    damaged = damaged + [(p, "judges the answers of a damaged generations fragment")
                         for p in dependents(results_dir, paths)]
    for path, why in damaged:
        folder = target / path.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), folder / path.name)
        (folder / f"{path.name}.why.txt").write_text(why + "\n")
    return target


def refuse_damaged(results_dir: Path) -> None:
    """A ResultsError naming every damaged fragment, for whatever would read them (the report)."""
    damaged = damaged_fragments(results_dir)
    if damaged:
        raise ResultsError(f"{len(damaged)} damaged fragment(s) in {results_dir}, which no Parquet reader can use: "
                           + "; ".join(f"{p} ({why})" for p, why in damaged[:10])
                           + (f"; and {len(damaged) - 10} more" if len(damaged) > 10 else "")
                           + ". 'capsafe run --resume SPEC' moves them aside (kept) and computes them again; the "
                           "report is written after that.")
