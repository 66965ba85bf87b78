#!/usr/bin/env bash
# EVICT with SGLang, end to end: launch (start-up calibration) -> query -> A/B against EAGLE3 (needs a CUDA GPU).
#
#   MODEL=/models/Qwen3-30B-A3B DRAFT=/models/Qwen3-30B-A3B-eagle3 scripts/serve_example.sh
#
# TABLE=T.json serves with that cost table instead of calibrating; SKIP_BENCH=1 skips the A/B.
# See docs/serving.md.
set -euo pipefail

MODEL=${MODEL:?set MODEL to the target checkpoint directory (e.g. Qwen3-30B-A3B)}
DRAFT=${DRAFT:?set DRAFT to its EAGLE-3 drafter checkpoint}
PORT=${PORT:-30000}
TABLE=${TABLE:-}
STEPS=${STEPS:-5}
TOPK=${TOPK:-8}
NUM_DRAFT=${NUM_DRAFT:-32}
DTYPE=${DTYPE:-bfloat16}
MEM_FRACTION=${MEM_FRACTION:-0.8}
CONCURRENCY=${CONCURRENCY:-1 4 16}
PYTHON=${PYTHON:-python}

SPEC_ARGS=(--speculative-draft-model-path "$DRAFT" --speculative-num-steps "$STEPS"
  --speculative-eagle-topk "$TOPK" --speculative-num-draft-tokens "$NUM_DRAFT")
SERVER_PID=""

stop_server() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}
trap stop_server EXIT

wait_ready() {
  for _ in $(seq 1 600); do
    if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; then return 0; fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "server exited during start-up" >&2; return 1; fi
    sleep 2
  done
  echo "server not ready after 20 minutes" >&2
  return 1
}

# $1 = algorithm (EVICT or EAGLE3), $2 = log file; extra env (EVICT_*) is inherited.
launch() {
  "$PYTHON" -m sglang.launch_server --model-path "$MODEL" --speculative-algorithm "$1" \
    "${SPEC_ARGS[@]}" --dtype "$DTYPE" --mem-fraction-static "$MEM_FRACTION" --port "$PORT" \
    >"$2" 2>&1 &
  SERVER_PID=$!
  wait_ready
}

bench() {  # $1 = label
  for c in $CONCURRENCY; do
    "$PYTHON" -m sglang.benchmark.serving --backend sglang --port "$PORT" \
      --dataset-name random --random-input-len 512 --random-output-len 256 \
      --num-prompts $((c * 16)) --max-concurrency "$c" --output-file "bench_$1.jsonl"
  done
}

# 1-2. Launch EVICT. Without a table it calibrates from its own captured graphs (cached for the next start).
if [[ -n "$TABLE" ]]; then export EVICT_COST_TABLE="$TABLE"; fi
EVICT_LOG_INTERVAL=50 launch EVICT server_evict.log
grep -E "EVICT: (calibrated|cost table from)|EVICT: verify widths" -A8 server_evict.log || true

# 3. Query: OpenAI client (greedy) and curl (sampling).
"$PYTHON" - "$PORT" <<'PY'
import sys

from openai import OpenAI

client = OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="EMPTY")
r = client.chat.completions.create(
    model="default",
    messages=[{"role": "user", "content": "Write a Python function that merges two sorted lists."}],
    temperature=0.0,
    max_tokens=200,
)
print(r.choices[0].message.content)
PY
curl -s "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "model": "default", "temperature": 0.7, "top_p": 0.9, "max_tokens": 100,
  "messages": [{"role": "user", "content": "Explain mixture-of-experts in two sentences."}]}'
echo

# 4. A/B: EVICT vs EAGLE3 with SGLang's bench_serving.
if [[ "${SKIP_BENCH:-0}" != 1 ]]; then
  bench evict
  grep "EVICT: steps=" server_evict.log | tail -3 || true
  stop_server
  launch EAGLE3 server_eagle3.log
  bench eagle3
  stop_server
  echo "results: bench_evict.jsonl vs bench_eagle3.jsonl (output throughput, TPOT, accept length)"
fi
