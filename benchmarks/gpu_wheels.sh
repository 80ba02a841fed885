#!/usr/bin/env bash
# The wheels a bare CUDA machine (Python 3.12 unless told otherwise; torch, transformers, peft, accelerate, pyarrow, numpy, pytest,
# ninja; offline) lacks to run benchmarks/gpu_check.py: DeepSpeed (its sdist built here into a pure-Python wheel,
# no ops compiled) and the few packages it and capsafe's spec need. About 6 MB (the carry limit is 64 MiB).
#   bash benchmarks/gpu_wheels.sh [OUT=gpu_wheels] [PYTHON_VERSION=3.12]
# (needs a package index; run it on a networked machine; PYTHON_VERSION is the GPU machine's, e.g. 3.11)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_wheels}
PYTHON_VERSION=${2:-3.12}
PIP=".venv/bin/python -m pip --disable-pip-version-check"
mkdir -p "$OUT"
DS_BUILD_OPS=0 $PIP wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w "$OUT"
$PIP download -q --only-binary=:all: --python-version "$PYTHON_VERSION" --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --no-deps -d "$OUT" \
  hjson msgpack py-cpuinfo nvidia-ml-py einops annotated-types typing-inspection jinja2 markupsafe \
  "pydantic==$(.venv/bin/python -c 'import pydantic; print(pydantic.VERSION)')" \
  "pydantic-core==$(.venv/bin/python -c 'import pydantic_core; print(pydantic_core.__version__)')"
du -sh "$OUT"
