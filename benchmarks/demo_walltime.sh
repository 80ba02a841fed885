#!/usr/bin/env bash
# Wall time of `make demo`: once with an empty capsafe cache (builds the demo world and DeepSpeed's CPU op),
# then again with the cache warm. Usage: bash benchmarks/demo_walltime.sh [LOGDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
logs=${1:-$(mktemp -d /tmp/capsafe-demo-bench.XXXX)}
mkdir -p "$logs"
make venv >/dev/null
export CAPSAFE_CACHE="$logs/cache"
rm -rf "$CAPSAFE_CACHE"
for run in first cached; do
  start=$(date +%s)
  make demo >"$logs/$run.log" 2>&1
  echo "$run run: $(( $(date +%s) - start )) s (log: $logs/$run.log)"
done
