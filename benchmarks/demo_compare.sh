#!/usr/bin/env bash
# Cached `make demo` wall time for several variants, alternating them round by round (the machine is shared and
# noisy: side by side, in one run). A variant is LABEL:COMMIT:OVERRIDES; each commit runs from its own git
# worktree (PYTHONPATH points the driver and the local Ray cluster's workers at it), into its own output folder.
#   bash benchmarks/demo_compare.sh LOGDIR ROUNDS "before:02a0dc6:" "resident:HEAD:" \
#        "resident-1x2:HEAD:eval.replicas=1 eval.cpus_per_replica=2"
# FIRST_ROUND=2 continues the numbering of an earlier call (other variants in other rounds). Prints one line per
# run: its wall time and its log (the log's last lines are the run's table).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
logs=$1; rounds=$2; shift 2
mkdir -p "$logs"
make venv >/dev/null
for variant in "$@"; do
  IFS=: read -r label commit _ <<<"$variant"
  wt="$logs/wt-$label"
  [ -d "$wt" ] || git worktree add --detach "$wt" "$(git rev-parse "$commit")" >/dev/null
done
for round in $(seq "${FIRST_ROUND:-1}" "$rounds"); do
  for variant in "$@"; do
    IFS=: read -r label _ overrides <<<"$variant"
    wt="$logs/wt-$label"; out="$logs/out-$label-$round"
    rm -rf "$out"
    start=$(date +%s)
    # shellcheck disable=SC2086  # the overrides are separate words
    (cd "$wt" && PYTHONPATH="$wt" "$repo/.venv/bin/python" -m capsafe.cli run jobs/demo.yaml "output_dir=$out" \
       $overrides >"$logs/$label-$round.log" 2>&1)
    echo "$label round $round: $(( $(date +%s) - start )) s (log: $logs/$label-$round.log)"
  done
done
