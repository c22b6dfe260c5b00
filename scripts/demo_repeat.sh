#!/usr/bin/env bash
# Run `make demo` N times in a row (default 20) and report how many passed, with each run's
# wall time; the logs of failed runs are kept in $LOGS (default: a new temp dir).
#   scripts/demo_repeat.sh [N]            WITH_TORCH=1 scripts/demo_repeat.sh 20
set -uo pipefail
cd "$(dirname "$0")/.."
n=${1:-20}
logs=${LOGS:-$(mktemp -d -t andromeda-demo-runs-XXXXXX)}
pass=0
: > "$logs/summary.txt"
for i in $(seq 1 "$n"); do
  start=$(date +%s%N)
  make demo WITH_TORCH="${WITH_TORCH:-0}" > "$logs/run-$i.log" 2>&1
  code=$?
  took=$(awk -v a="$start" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
  if [ "$code" -eq 0 ]; then
    pass=$((pass + 1)); status=pass; rm -f "$logs/run-$i.log"
  else
    status="FAIL (exit $code, log $logs/run-$i.log)"
  fi
  echo "run $i/$n: $status in ${took}s" | tee -a "$logs/summary.txt"
done
echo "passed $pass of $n (WITH_TORCH=${WITH_TORCH:-0})" | tee -a "$logs/summary.txt"
[ "$pass" -eq "$n" ]
