#!/usr/bin/env bash
# One device call on a CUDA machine: the gpu-marked kernel tests, then the benchmarks; results,
# logs and a markdown summary under $OUT (default: benchmarks/results/run-<UTC date>).
#
#   benchmarks/run_all.sh                 # tests gn noise unet host, in that order
#   benchmarks/run_all.sh tests gn        # a subset (e.g. two device calls: "tests gn", "noise unet")
#
# Estimates on an H100 with cold compile caches: tests 2-3 min, gn 4-5 min, noise 1-2 min, unet
# 4-6 min (8 variants), host < 1 min: all of them take two or three device calls (10 minutes each at
# most), e.g. "tests host noise", then "unet", then "gn". BENCH_QUICK=1 trims the shapes.
# Each stage has its own time limit (LIMIT_<STAGE> seconds) and is interrupted cleanly at it (what
# was measured so far is still written); all stages together stop at TOTAL_LIMIT (default 560 s,
# under the device's 600 s per command): a later stage gets what is left, or is skipped. Results
# are merged into $OUT after every stage, so a command killed from outside still returns what the
# finished stages measured. Files in $OUT (8 at most come back from a device call):
#   env.txt run.log tests_junit.xml results.json summary.md raw.tar.gz
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/run-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
STAGE_DIR="$(mktemp -d)"
trap 'rm -rf "$STAGE_DIR"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 BENCH_OUT="$STAGE_DIR"
unset TRITON_INTERPRET GENSCALE_KERNELS
PY="${PYTHON:-python3}"
LOG="$OUT/run.log"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests gn noise unet host)

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  "$PY" -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "commit ${BENCH_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

DEADLINE=$((SECONDS + ${TOTAL_LIMIT:-560}))

publish() {  # the finished stages' results into $OUT (merged: at most 8 files come back)
  shopt -s nullglob
  local parts=("$STAGE_DIR"/results_*.json)
  shopt -u nullglob
  [ ${#parts[@]} -gt 0 ] || return 0
  "$PY" benchmarks/summarize.py --merge-json "$OUT/results.json" "${parts[@]}" >"$OUT/summary.md" 2>>"$LOG"
  tar -czf "$OUT/raw.tar.gz" -C "$STAGE_DIR" .
}

run_stage() {  # name, limit in seconds, command...
  local name=$1 limit=$2 t0=$SECONDS
  local left=$((DEADLINE - SECONDS - 15))  # 15 s for the interrupt, the merge and the tar
  shift 2
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 30 ]; then
    echo "=== $name: skipped, ${left}s left of TOTAL_LIMIT" | tee -a "$LOG"
    return
  fi
  echo "=== $name (limit ${limit}s)" | tee -a "$LOG"
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$LOG"
  publish
}

XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 12)
BENCH=("$PY" -m pytest --benchmark-only -q -rs -p no:cacheprovider)
for stage in "${stages[@]}"; do
  case "$stage" in
    tests) run_stage tests "${LIMIT_TESTS:-240}" "$PY" -m pytest tests -m gpu -q -rs -p no:cacheprovider \
             "${XDIST[@]}" --junitxml="$OUT/tests_junit.xml" ;;
    gn) run_stage gn "${LIMIT_GN:-330}" env BENCH_NAME=results_gn "${BENCH[@]}" benchmarks/test_bench_group_norm.py \
          --benchmark-json="$STAGE_DIR/raw_gn.json" ;;
    noise) run_stage noise "${LIMIT_NOISE:-180}" env BENCH_NAME=results_noise "${BENCH[@]}" benchmarks/test_bench_noise.py \
             --benchmark-json="$STAGE_DIR/raw_noise.json" ;;
    unet) run_stage unet "${LIMIT_UNET:-520}" env BENCH_NAME=results_unet "${BENCH[@]}" benchmarks/test_bench_unet.py \
            --benchmark-json="$STAGE_DIR/raw_unet.json" ;;
    host) run_stage host "${LIMIT_HOST:-60}" env BENCH_NAME=results_host "${BENCH[@]}" benchmarks/test_bench_host.py \
            --benchmark-json="$STAGE_DIR/raw_host.json" ;;
    *) echo "unknown stage $stage (tests, gn, noise, unet, host)" | tee -a "$LOG" ;;
  esac
done

[ -f "$OUT/summary.md" ] && cat "$OUT/summary.md"
