#!/usr/bin/env bash
# Runs the GPU check on a bare CUDA machine from a clone of this repository and a folder of carried wheels
# (benchmarks/gpu_wheels.sh builds it): installs them into .gpu_deps/ (no network, no dependencies pulled),
# then runs benchmarks/gpu_check.py with capsafe from this checkout. Figures go to gpu_check.json.
# The whole run is meant to fit 8 minutes on one H100: no stage starts 380 s after this script did (install
# included), and the longest stage is estimated at under a minute (benchmarks/RESULTS.md); --budget-s overrides.
#   bash benchmarks/gpu_check.sh WHEELS_DIR [gpu_check.py options]
set -euo pipefail
START=$SECONDS
cd "$(dirname "$0")/.."
WHEELS=${1:?usage: bash benchmarks/gpu_check.sh WHEELS_DIR [options]}
shift
python -m pip install -q --no-index --no-deps --target .gpu_deps "$WHEELS"/*.whl
export PYTHONPATH="$PWD/.gpu_deps:$PWD${PYTHONPATH:+:$PYTHONPATH}" DS_BUILD_OPS=0 TOKENIZERS_PARALLELISM=false
exec python benchmarks/gpu_check.py --out gpu_check.json --budget-s $((380 - (SECONDS - START))) "$@"
