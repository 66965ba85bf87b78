#!/usr/bin/env bash
# The prepared GPU check (issue 22, docs/gpu.md): run it first whenever a GPU is lent, as ONE device
# call of at most 9 minutes, from the repository root, with the bundle carried:
#
#   python scripts/build_gpu_bundle.py            # here, once: .gpu_bundle/site.tar.xz (about 10 MiB)
#   device run: bash scripts/gpu_check.sh          # carry: [".gpu_bundle"], timeout_s 560
#
# Each step runs under its own time box, so a failing or hanging step leaves the others' results.
# Everything lands in $OUT (default out/gpu_check): summary.txt, one JSON per step, the pytest and
# kernel-bench logs, and the servers' logs gathered into servers.log (at most 8 files come back).
# GPU_CHECK_STEPS picks steps (default: "env kernels gputests serve cost"); GPU_CHECK_BUDGET scales
# the boxes (seconds in total, default 480).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 EVICT_GPU_SITE=${EVICT_GPU_SITE:-/tmp/site}
PY=${PYTHON:-python3}
STEPS=${GPU_CHECK_STEPS:-env kernels gputests serve cost}
TOTAL=${GPU_CHECK_BUDGET:-480}
t0=$(date +%s)
summary="$OUT/summary.txt"
echo "gpu_check $(date -u +%FT%TZ) steps: $STEPS budget ${TOTAL}s" >"$summary"

# The bundle: SGLang's Python package and the wheels the GPU machine lacks, unpacked once.
if [[ ! -d "$EVICT_GPU_SITE/sglang" ]]; then
  if [[ -f .gpu_bundle/site.tar.xz ]]; then
    mkdir -p "$EVICT_GPU_SITE" && tar -xJf .gpu_bundle/site.tar.xz -C "$EVICT_GPU_SITE"
    echo "bundle unpacked to $EVICT_GPU_SITE in $(( $(date +%s) - t0 ))s" >>"$summary"
  else
    echo "NO BUNDLE: .gpu_bundle/site.tar.xz missing (carry .gpu_bundle)" >>"$summary"
  fi
fi
# The same paths the server gets (evict.testing.gpu_server.gpu_env): shim, bundle, checkout.
export PYTHONPATH="$PWD/evict/testing/cuda_shim:$EVICT_GPU_SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export EVICT_CUDA_SHIM=1 SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK=1

left() { echo $(( TOTAL - ($(date +%s) - t0) )); }

run_step() {  # name box_seconds command...
  local name=$1 box=$2; shift 2
  local l; l=$(left)
  if (( l < 20 )); then echo "$name: skipped (${l}s left)" >>"$summary"; return; fi
  (( box > l - 5 )) && box=$(( l - 5 ))
  local s; s=$(date +%s)
  timeout -k 10 "$box" "$@" >"$WORK/$name.out" 2>&1
  local rc=$?
  echo "$name: rc=$rc $(( $(date +%s) - s ))s (box ${box}s)" >>"$summary"
  tail -c 20000 "$WORK/$name.out" >"$OUT/$name.log" 2>/dev/null
}

for step in $STEPS; do
  case $step in
    env) run_step env 40 "$PY" -m evict.testing.gpu_check env --out "$WORK/res" ;;
    kernels) run_step kernels 70 "$PY" -m evict.testing.gpu_check kernels --out "$WORK/res" ;;
    gputests)
      run_step gputests 100 bash -c "$PY -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py tests/test_cuda_ops.py 2>&1; \
        $PY scripts/bench_kernels.py --iters 200 --bs 1 8 32 128 --k 8 32 64 --json $WORK/res/bench_kernels.json 2>&1" ;;
    serve) run_step serve 200 "$PY" -m evict.testing.gpu_check serve --out "$WORK/res" --budget 190 ;;
    cost) run_step cost 150 "$PY" -m evict.testing.gpu_check cost --out "$WORK/res" --budget 140 ;;
    *) echo "unknown step $step" >>"$summary" ;;
  esac
done

# Gather: step JSONs into one results file, server logs (tails) into one log.
"$PY" - "$WORK/res" "$OUT/results.json" <<'PYEOF' 2>>"$summary"
import json, sys, pathlib
res = pathlib.Path(sys.argv[1]); out = {}
for f in sorted(res.glob("*.json")) if res.exists() else []:
    try:
        out[f.stem] = json.loads(f.read_text())
    except Exception as e:
        out[f.stem] = f"<unreadable: {e}>"
pathlib.Path(sys.argv[2]).write_text(json.dumps(out, indent=1, default=str))
PYEOF
: >"$OUT/servers.log"
for f in "$WORK"/res/logs/*.log; do
  [[ -f $f ]] || continue
  { echo "===== $(basename "$f") ====="; head -c 6000 "$f"; echo; echo "..."; tail -c 14000 "$f"; echo; } >>"$OUT/servers.log"
done
echo "total $(( $(date +%s) - t0 ))s" >>"$summary"
cat "$summary"
