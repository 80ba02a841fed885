"""Object storage (``s3://``, ``gs://``) for a run's results, through pyarrow's file systems: a multi-node cluster
needs no shared mount.

A run whose ``output_dir`` is a URL works in a *working copy* on the driver's node
(``$CAPSAFE_CACHE/object-store/<scheme>/<bucket>/<key>``): every file is written there first, atomically and
durably as always, then uploaded under the same relative key (an object store's PUT is atomic too: an object
exists whole or not at all). The object store is the run's home: ``--resume``, ``capsafe report``, ``evaluate``
and ``compare`` download what the working copy lacks before they read. Ray Train's resume checkpoints go to the
URL directly (Ray's own storage); kept model checkpoints are uploaded by the trial's rank 0 before its last
report, and a pool replica on any node downloads a checkpoint into the same working-copy path before it loads it.

Credentials and endpoints come from the environment as pyarrow reads them (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL`` for an S3-compatible server, ``GOOGLE_APPLICATION_CREDENTIALS``, ...), or from URL query
parameters (``s3://bucket/x?endpoint_override=...``); never from the spec.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from urllib.parse import urlsplit

from capsafe.errors import CapsafeError

SCHEMES = ("s3", "gs")
REMOTE_MARKER = ".capsafe-remote"  # in a working copy: the URL it mirrors (never uploaded)
_PUSHED = ".capsafe-pushed.json"  # in a working copy: (size, mtime) of each file as last uploaded
NEVER_PUSHED = frozenset({REMOTE_MARKER, _PUSHED, ".capsafe.lock"})
_lock = threading.Lock()
_localized: dict[str, str] = {}  # URL -> its whole local copy, in this process


def is_url(value: str | os.PathLike[str] | None) -> bool:
    """Whether ``value`` names object storage (``s3://`` or ``gs://``)."""
    return isinstance(value, str) and urlsplit(value).scheme in SCHEMES and "://" in value


def join(url: str, *parts: str) -> str:
    """``url`` with ``parts`` appended as key segments (its query string, if any, kept at the end)."""
    head, _, query = url.partition("?")
    path = "/".join([head.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return f"{path}?{query}" if query else path


def _filesystem(url: str):  # noqa: ANN202 - pyarrow.fs.FileSystem, whose stubs mypy does not see
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(url)


def cache_root() -> Path:
    """capsafe's cache folder: built worlds, compiled ops, object-storage working copies."""
    return Path(os.environ.get("CAPSAFE_CACHE", Path.home() / ".cache" / "capsafe")).expanduser()


def working_copy(url: str) -> Path:
    """Where ``url`` is copied on this node: the same path on every node, so a path and its URL map both ways."""
    parts = urlsplit(url)
    return cache_root() / "object-store" / parts.scheme / parts.netloc / parts.path.strip("/")


def remote_of(local: Path) -> str | None:
    """The URL a working copy mirrors (its marker file), or None for a plain local folder."""
    marker = local / REMOTE_MARKER
    try:
        return marker.read_text().strip() or None
    except OSError:
        return None


def _listing(url: str) -> dict[str, int]:
    """Relative key -> size of every object under ``url`` (a single object: '' -> its size; nothing: {})."""
    import pyarrow.fs as pafs

    try:
        fs, root = _filesystem(url)
        info = fs.get_file_info(root)
    except OSError as exc:  # the first contact with the store: say what to check, not a traceback
        raise CapsafeError(f"cannot reach {url}: {str(exc)[:300]}. Check the bucket name and the credentials and "
                           "endpoint in this environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...; "
                           "docs/cloud-storage.md)") from None
    if info.type == pafs.FileType.File:
        return {"": info.size}
    if info.type != pafs.FileType.Directory:
        return {}
    return {i.path[len(root):].lstrip("/"): i.size for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
            if i.type == pafs.FileType.File}


def holds_anything(url: str) -> bool:
    """Whether anything a run wrote is stored under ``url`` (a live run's lock object alone does not count)."""
    return any(key not in NEVER_PUSHED for key in _listing(url))


def read_text(url: str) -> str | None:
    """The object at ``url`` as text; None if there is none."""
    fs, key = _filesystem(url)
    try:
        with fs.open_input_stream(key) as src:
            return bytes(src.read()).decode()
    except (FileNotFoundError, OSError):
        return None


def write_text(url: str, text: str) -> None:
    fs, key = _filesystem(url)
    with fs.open_output_stream(key) as dst:
        dst.write(text.encode())


def delete(url: str) -> None:
    fs, key = _filesystem(url)
    with contextlib.suppress(FileNotFoundError, OSError):
        fs.delete_file(key)


def upload_file(local: Path, url: str) -> None:
    fs, key = _filesystem(url)
    with local.open("rb") as src, fs.open_output_stream(key) as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)


def upload_tree(local: Path, url: str) -> int:
    """Upload every file under ``local`` to the same relative keys under ``url``; returns the count."""
    count = 0
    for path in sorted(local.rglob("*")):
        if path.is_file() and path.name not in NEVER_PUSHED:
            upload_file(path, join(url, path.relative_to(local).as_posix()))
            count += 1
    return count


def download(url: str, local: Path, skip: tuple[str, ...] = (), listing: dict[str, int] | None = None) -> int:
    """Copy what ``local`` lacks (or holds at another size) of the object or folder at ``url``: each file through a
    temporary name and a rename, so a reader never sees half of one. Keys under a ``skip`` prefix are left. Returns
    how many files were copied."""
    fs, root = _filesystem(url)
    count = 0
    for rel, size in sorted((_listing(url) if listing is None else listing).items()):
        if any(rel == s or rel.startswith(f"{s}/") for s in skip):
            continue
        target = local / rel if rel else local
        if target.is_file() and target.stat().st_size == size:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
        with fs.open_input_stream(f"{root}/{rel}" if rel else root) as src, tmp.open("wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        os.replace(tmp, target)
        count += 1
    return count


def localize(path: str) -> str:
    """A local path for ``path``: itself, or for a URL its working copy, downloaded first where it lacks files
    (a model checkpoint a pool replica on another node is asked to serve)."""
    if not is_url(path):
        return path
    if path in _localized:  # checkpoints and data files are never rewritten under their key
        return _localized[path]
    local, listing = working_copy(path), _listing(path)
    if not listing:
        raise FileNotFoundError(f"{path}: nothing is stored there")
    download(path, local, listing=listing)
    _localized[path] = str(local)
    return str(local)


def to_url(path: str, local_root: Path, url: str) -> str:
    """``path`` under ``local_root`` (a working copy) as the URL it is uploaded to; other paths unchanged."""
    try:
        rel = Path(path).relative_to(local_root)
    except ValueError:
        return path
    return join(url, rel.as_posix())


def push(local: Path, only: Path | None = None) -> int:
    """Upload the files of the working copy ``local`` that changed since they were last uploaded (or just ``only``),
    leaving ``models/`` (uploaded by the trials) and ``ray/`` (Ray's own storage); a plain local folder: nothing.
    Returns how many files went up."""
    url = remote_of(local)
    if url is None:
        return 0
    with _lock:  # the driver's threads (the streaming evaluation, the sweep's callbacks) push into one state file
        state_file = local / _PUSHED
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            state = {}
        files = [only] if only is not None else [
            p for p in local.rglob("*") if p.is_file() and p.name not in NEVER_PUSHED
            and p.relative_to(local).parts[0] not in ("models", "ray") and not p.name.endswith(".tmp")
            and not p.name.endswith(".part")]
        count = 0
        for path in sorted(files):
            rel = path.relative_to(local).as_posix()
            stat = path.stat()
            if state.get(rel) == [stat.st_size, stat.st_mtime_ns]:
                continue
            upload_file(path, join(url, rel))
            state[rel] = [stat.st_size, stat.st_mtime_ns]
            count += 1
        tmp = state_file.with_name(f"{_PUSHED}.tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, state_file)
    return count


def attach(local: Path, url: str) -> None:
    """Mark ``local`` as the working copy of ``url`` (``push`` and ``write_table`` upload into it from now on)."""
    local.mkdir(parents=True, exist_ok=True)
    (local / REMOTE_MARKER).write_text(url + "\n")


def pull(url: str, skip: tuple[str, ...] = ("models", "ray", ".capsafe.lock")) -> Path:
    """The working copy of the results at ``url``, brought up to date with it (model checkpoints and Ray's state
    stay remote until something loads them) and attached to it."""
    local = working_copy(url)
    download(url, local, skip)
    attach(local, url)
    return local


def delete_all(url: str) -> None:
    """Delete every object under ``url`` but the live run's lock (``--overwrite`` only)."""
    fs, root = _filesystem(url)
    for key in _listing(url):
        if key not in NEVER_PUSHED:
            fs.delete_file(f"{root}/{key}" if key else root)
