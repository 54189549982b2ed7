#!/usr/bin/env bash
# Everything the GPU machine has to run, in one go (at most 9 minutes on one H200), results under $OUT:
#   1. bench/serve.py, 2B: the whole service (WebSocket + OpenAI clients) at c=1/32/64 beside the
#      in-process executor, the follow-up and the arriving-pictures scenarios
#   2. bench/gpu_check.py, 2B: fused kernels, engine vs stock generate, teacher forcing
#   3. teacher forcing for 8B and 30B-A3B (in memory)
# The project's pinned transformers (and the service's own dependencies the machine lacks) travel
# as wheels in .whl/ (git-ignored; bench/gpu_wheels.sh makes them). Each step has its
# own time limit, so one that hangs cannot take the others' time; the order is by importance.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || { echo "wheel install failed"; exit 1; }
fi
LOG="$OUT/run.log"
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
} 2>&1 | tee "$LOG"

step() {  # step SECONDS NAME COMMAND...: run with a time limit, everything into the log
  local limit=$1 name=$2; shift 2
  echo "=== $name ($(date -u +%T), limit ${limit}s)" | tee -a "$LOG"
  local started=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG" | grep -v -E '^\s*$' | tail -n 40
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - started)) s" | tee -a "$LOG"
}

WORK=/tmp/vlbridge-gpu
mkdir -p $WORK
step 270 "serve 2b" python3 bench/serve.py --model 2b --concurrency 1,32,64 --rounds 4 \
  --followup-concurrency 1,16 --arrive 32,16,1.0,5 --workdir $WORK/serve --out "$OUT/serve-2b.json"
cp $WORK/serve/executor.json "$OUT/executor-2b.json" 2>/dev/null
tail -c 3000000 $WORK/serve/serve.log >"$OUT/serve-server.log" 2>/dev/null
step 100 "gpu_check 2b" python3 bench/gpu_check.py --model 2b --out "$OUT/gpu_check-2b.json"
step 70 "teacher forcing 8b" python3 bench/gpu_check.py --model 8b --teacher-forcing-only --out "$OUT/gpu_check-8b.json"
step 80 "teacher forcing 30b-a3b" python3 bench/gpu_check.py --model 30b-a3b --teacher-forcing-only \
  --out "$OUT/gpu_check-30b-a3b.json"
date -u | tee -a "$LOG"
