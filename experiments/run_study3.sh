#!/usr/bin/env bash
# Study 3 (issue 20): tune the EWMA controller on a small Qwen2-shaped model, then apply it
# unchanged to a 14x larger one at the same context (T=512), beside static (full and short
# window), a SkyLadder-like ramp and EWMAs searched on the large model itself (the best by val
# loss, and the knee of a two-objective search's Pareto front).
#
#   experiments/run_study3.sh [--smoke-test] [STORE]
#
#   1. metalearner sweep experiments/study_long_small.yaml    small model: tuning + comparison
#   2. STORE/ewma_small_best.yaml <- that sweep's best_ewma-tuned.yaml (the controller it
#      confirmed on its seeds: {controller: {name: ewma, factor, beta, threshold}})
#   3. metalearner sweep experiments/study_long.yaml --arm ewma-transferred=STORE/ewma_small_best.yaml
#                                                           large model: the long study
#
# STORE (default ./study_store/study3) gets one SQLite MLflow store (mlflow.db) for both
# sweeps, Ray's folders (ray/), the exported controller and timings.txt (wall time and load
# of each step, for RESULTS.md). --smoke-test runs both specs' smoke blocks (about a minute).
# Any controller file can be added the same way: metalearner sweep SPEC --arm NAME=FILE.
# METALEARNER overrides the command (default: python -m metalearner.cli); relative paths
# (STORE, FILE) are taken from the working folder, the specs from this script's folder.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

smoke=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke-test) smoke=(--smoke-test); shift ;;
    -*) echo "run_study3.sh: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
store="${1:-study_store/study3}"
mkdir -p "$store"
store="$(cd "$store" && pwd)"
read -r -a ml <<< "${METALEARNER:-python -m metalearner.cli}"
uri="sqlite:///$store/mlflow.db"
log="$store/timings.txt"

step() {  # step NAME COMMAND...: run it, append its wall time and the load around it to timings.txt
  local name="$1"; shift
  local load0 start
  load0="$(cut -d' ' -f1-3 /proc/loadavg)"
  start=$SECONDS
  "$@"
  echo "$name: $((SECONDS - start)) s (load before: $load0; after: $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%FT%TZ))" \
    | tee -a "$log"
}

echo "study 3 ${smoke[*]:-full}: $(nproc) CPUs, store $store" | tee -a "$log"
step "sweep study_long_small" "${ml[@]}" sweep "$here/study_long_small.yaml" "${smoke[@]}" \
  --tracking-uri "$uri" --storage "$store/ray"

small="$(ls -td "$store"/ray/study_long_small-2*/ | head -n 1)"
cp "$small/best_ewma-tuned.yaml" "$store/ewma_small_best.yaml"
echo "transferred controller: $store/ewma_small_best.yaml (from $small)"
cat "$store/ewma_small_best.yaml"

step "sweep study_long" "${ml[@]}" sweep "$here/study_long.yaml" "${smoke[@]}" \
  --arm "ewma-transferred=$store/ewma_small_best.yaml" \
  --tracking-uri "$uri" --storage "$store/ray"
echo "done; compare again at any time: metalearner compare study_long --tracking-uri $uri --out $store/report_long"
