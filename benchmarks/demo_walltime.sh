#!/usr/bin/env bash
# Wall time of the demo (jobs/demo.yaml) with each evaluation schedule: once with an empty capsafe cache
# (builds the demo world, its judge and DeepSpeed's CPU op), then again with the cache warm.
#   bash benchmarks/demo_walltime.sh [LOGDIR]                 both schedules, first and cached runs
#   CACHED_ONLY=1 bash benchmarks/demo_walltime.sh [LOGDIR]   cached runs only, with the usual cache
#   SCHEDULES="streaming" ...                                  one schedule
set -euo pipefail
cd "$(dirname "$0")/.."
logs=${1:-$(mktemp -d /tmp/capsafe-demo-bench.XXXX)}
mkdir -p "$logs"
make venv >/dev/null
runs="first cached"
if [ -n "${CACHED_ONLY:-}" ]; then runs="cached"; fi
for schedule in ${SCHEDULES:-streaming sequential}; do
  if [ -z "${CACHED_ONLY:-}" ]; then export CAPSAFE_CACHE="$logs/cache-$schedule"; rm -rf "$CAPSAFE_CACHE"; fi
  for run in $runs; do
    start=$(date +%s)
    .venv/bin/python -m capsafe.cli run jobs/demo.yaml "eval.schedule=$schedule" >"$logs/$schedule-$run.log" 2>&1
    echo "$schedule, $run run: $(( $(date +%s) - start )) s (log: $logs/$schedule-$run.log)"
  done
done
