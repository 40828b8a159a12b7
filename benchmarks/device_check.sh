#!/usr/bin/env bash
# One call on the GPU machine (issue 10): CUDA tests and `metalearner train` on CUDA run side
# by side (light GPU load), then bench_gpu.py alone on the quiet GPU. Logs go to $OUT
# (or ./device_out). Run from the repository root:
#
#   bash benchmarks/device_check.sh            # on the GPU machine
#   bash benchmarks/device_check.sh --dry-run  # here, on CPU: the same steps, tiny sizes
#
# PHASES (default "tests cli bench") picks the parts; BENCH_ARGS (default "--sweep") goes to
# bench_gpu.py, e.g. BENCH_ARGS="--only model,knobs"; TESTS overrides the pytest arguments.
#
# The GPU machine has neither Ray nor MLflow (that is part of what this checks). Speech needs
# `datasets` and `soundfile`: wheels in .whl/ and a corpus in .speechdata/ are used when there
# (made with `metalearner data speech-digits --out .speechdata --n 48`), else speech is skipped
# and the log says so.
set -u -o pipefail
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
DRY=0; [ "${1:-}" = "--dry-run" ] && DRY=1
PY=python3
START=$(date +%s)
stamp() { echo "[$(( $(date +%s) - START )) s] $*"; }

{
stamp "host: $(uname -m); $(nvidia-smi -L 2>/dev/null | head -1)"
$PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available(), 'python', sys.version.split()[0])"
for m in ray mlflow datasets soundfile; do
  $PY -c "import $m" 2>/dev/null && echo "  $m: installed" || echo "  $m: not installed"
done
} 2>&1 | tee "$OUT/env.txt"

# ---- 1. CLI train on CUDA (background) ---------------------------------------------------
cli_checks() {
  local dev=cuda; [ $DRY = 1 ] && dev=cpu
  local common=(--steps 6 --no-mlflow --set train.device=$dev --set train.batch_size=8 --set train.eval_every=3
                --set train.eval_batches=1 --set model.preset=tiny --set model.d_model=64)
  for task in recall text; do
    for engine in torch hf; do
      stamp "train --task $task --engine $engine (device $dev)"
      local ck=(); [ $engine = torch ] && ck=(--checkpoint-dir /tmp/ck_${task}_${engine})
      rm -rf /tmp/ck_${task}_${engine} /tmp/trace_${task}_${engine}.csv
      timeout 240 $PY -m metalearner.cli train --task $task --engine $engine --controller ewma "${common[@]}" \
        --set train.seq_len=64 --trace-csv /tmp/trace_${task}_${engine}.csv "${ck[@]}" \
        > /tmp/cli_${task}_${engine}.log 2>&1
      local rc=$?
      echo "  exit $rc; $(grep -c . /tmp/trace_${task}_${engine}.csv 2>/dev/null) csv lines"
      tail -n $([ $rc = 0 ] && echo 9 || echo 40) /tmp/cli_${task}_${engine}.log
    done
  done
  # resume the torch-engine recall checkpoint (taken on $dev) on $dev and on cpu, 3 more steps
  for rdev in $dev cpu; do
    stamp "resume recall checkpoint on $rdev"
    rm -rf /tmp/ck_resume_$rdev && cp -r /tmp/ck_recall_torch /tmp/ck_resume_$rdev
    timeout 240 $PY -m metalearner.cli train --task recall --engine torch --controller ewma "${common[@]}" \
      --set train.seq_len=64 --set train.device=$rdev --steps 9 --checkpoint-dir /tmp/ck_resume_$rdev --resume \
      --trace-csv /tmp/trace_resume_$rdev.csv > /tmp/cli_resume_$rdev.log 2>&1
    local rc=$?
    echo "  exit $rc; steps in csv: $(cut -d, -f1 /tmp/trace_resume_$rdev.csv 2>/dev/null | tail -n +2 | tr '\n' ' ')"
    tail -n $([ $rc = 0 ] && echo 3 || echo 40) /tmp/cli_resume_$rdev.log
  done
  if [ -d .whl ] && [ -f .speechdata/metadata.csv ]; then
    stamp "speech: installing carried wheels into /tmp/site"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      > /tmp/pip.log 2>&1 || { echo "  pip failed:"; tail -5 /tmp/pip.log; }
    for engine in torch hf; do
      stamp "train --task speech --engine $engine (device $dev)"
      PYTHONPATH=$PWD:/tmp/site timeout 300 $PY -m metalearner.cli train --task speech --engine $engine \
        --controller ewma --steps 6 --no-mlflow --set train.device=$dev --set train.batch_size=8 \
        --set train.eval_every=3 --set train.eval_batches=1 --set model.preset=tiny --set model.d_model=64 \
        --set model.window=8 --set task.data_dir=.speechdata --trace-csv /tmp/trace_speech_$engine.csv \
        > /tmp/cli_speech_$engine.log 2>&1
      local rc=$?
      echo "  exit $rc; $(grep -c . /tmp/trace_speech_$engine.csv 2>/dev/null) csv lines"
      tail -n $([ $rc = 0 ] && echo 9 || echo 40) /tmp/cli_speech_$engine.log
    done
  else
    echo "speech: SKIPPED (no .whl/ wheels or .speechdata/ corpus carried)"
  fi
}
PHASES=${PHASES:-tests cli bench}
CLI_PID=
if [[ " $PHASES " == *" cli "* ]]; then
  cli_checks > "$OUT/cli.txt" 2>&1 &
  CLI_PID=$!
fi

# ---- 2. CUDA tests (foreground, next to the CLI runs) ------------------------------------
if [[ " $PHASES " == *" tests "* ]]; then
  stamp "pytest" | tee "$OUT/tests.txt"
  A=tests/test_attention.py
  timeout ${TESTS_TIMEOUT:-240} $PY -m pytest -q -rfEs --tb=short -p no:cacheprovider -p no:logging ${TESTS:-tests/test_cuda.py \
    $A::test_flex_path_matches_blocked_path $A::test_chunked_band_bf16_on_cuda_matches_float64_dense \
    $A::test_hybrid_module_bf16_uses_chunks_and_matches_float32 $A::test_flex_bf16_matches_float64_dense} \
    >> "$OUT/tests.txt" 2>&1
  grep -E "passed|failed|^FAILED|^ERROR|Error|assert" "$OUT/tests.txt" | tail -n 40
fi
if [ -n "$CLI_PID" ]; then
  wait $CLI_PID
  stamp "cli checks done" | tee -a "$OUT/cli.txt"
  grep -E "^\[|exit|SKIPPED|pip failed" "$OUT/cli.txt"
fi

# ---- 3. benchmark alone ---------------------------------------------------------------------
if [[ " $PHASES " == *" bench "* ]]; then
  stamp "bench_gpu ${BENCH_ARGS:---sweep}"
  if [ $DRY = 1 ]; then
    timeout 900 $PY benchmarks/bench_gpu.py --quick ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt"
  else
    timeout ${BENCH_TIMEOUT:-400} $PY benchmarks/bench_gpu.py ${BENCH_ARGS:---sweep} 2>&1 | tee "$OUT/bench.txt"
  fi
fi
stamp "done"
