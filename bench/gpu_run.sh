#!/usr/bin/env bash
# Everything the GPU machine has to run, in one go (at most 9 minutes on one H200), results under $OUT:
#   1. bench/serve.py, 2B: the whole service (WebSocket + OpenAI clients) at c=32/64 beside the
#      in-process executor, the follow-up (c=1 with the server's own TTFT per ask, c=16) and the
#      arriving-pictures scenarios, with the clients in worker processes; then ws1, the WebSocket
#      clients all in one process (the way before, to see what the load generator adds); the
#      server's timing lines (server/inference/profile.py)
#   2. teacher forcing for 2B (bench/gpu_check.py): the engine's logits against stock
#      transformers on the GPU; `GPU_CHECK=1` runs the whole 2B check (kernels, engine vs generate)
#   3. bench/prepare.py: picture preparation on 8 threads (pictures/s) and the device's share, with
#      and without a busy Python thread, decoding on the threads and in 8 worker processes
#   4. bench/serve.py, 8B then 30B-A3B at c=64, random weights built in GPU memory (30B-A3B's
#      58 GiB would not fit on the disk): executor in process, then the service over WebSocket
# The 8B/30B-A3B teacher forcing passed on 2026-11-30 and is not rerun.
# `PROBE=1` ends with bench/prefill_probe.py (masked attention at new shapes, follow-up prefill,
# preparation on 8 threads); `ONLY_2B=1` leaves out 8B and 30B-A3B; `PREPARE=0` leaves out step 3;
# `BASE=DIR` measures 2B from the tree in DIR too (before a change), side by side; `SKIP_2B=1` leaves
# out steps 1-2 (8B and 30B-A3B in a call of their own: all steps together take over 10 minutes);
# `TF=0` leaves out the teacher forcing; `KV=fp8` runs the service, the executor and the teacher
# forcing of this tree with a float8 KV cache (model.kv_cache_dtype; a BASE tree runs its default,
# so BASE=<this tree> compares the two side by side); `WEIGHTS=fp8` the same with float8 weights
# (model.weights_dtype; the teacher forcing then also compares with the float8 reference).
# The commit measured is read from the file COMMIT at the top of the tree when there is one (write
# it when copying a branch's tree: a copy's git metadata may name another checkout's head).
# Files back in $OUT: run.log, the serve-*.json and gpu_check/probe json, and logs.tar.gz (the
# executor json and the servers' logs of each step), at most 8 files.
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
# FlashAttention 4 (bench/gpu_fa4.sh): its first part copied to /tmp/fa4parts by a call before, the
# second carried in .fa4b.
if ls /tmp/fa4parts/fa4part.* .fa4b/fa4part.* >/dev/null 2>&1; then
  cat /tmp/fa4parts/fa4part.* .fa4b/fa4part.* | tar -xJ -C /tmp \
    && export PYTHONPATH=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH \
    || { echo "FlashAttention 4 unpacking failed"; exit 1; }
fi
LOG="$OUT/run.log"
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  if [ -f COMMIT ]; then echo "commit $(cat COMMIT)"; else git log -1 --format='commit %h %s' 2>/dev/null || true; fi
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
  python3 -c 'import flash_attn.cute.interface' 2>/dev/null && echo "FlashAttention 4 importable" || echo "no FlashAttention 4"
} 2>&1 | tee "$LOG"

step() {  # step SECONDS NAME COMMAND...: run with a time limit, everything into the log
  local limit=$1 name=$2; shift 2
  echo "=== $name ($(date -u +%T), limit ${limit}s)" | tee -a "$LOG"
  local started=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG" | grep -v -E '^\s*$' | tail -n 60
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - started)) s" | tee -a "$LOG"
}

keep_logs() {  # keep_logs NAME: the server's log (its timing lines whole, the rest's tail) and the executor's figures
  local work=$WORK/$1
  cp "$work/executor.json" "$KEEP/executor-$1.json" 2>/dev/null
  grep -h "vlbridge.profile\|WARNING\|Traceback\|Error\|error" "$work/serve.log" >"$KEEP/serve-$1-profile.log" 2>/dev/null
  tail -c 200000 "$work/serve.log" >"$KEEP/serve-$1-server-tail.log" 2>/dev/null
  tar -czf "$OUT/logs.tar.gz" -C "$KEEP" . 2>/dev/null
}

WORK=/tmp/vlbridge-gpu
KEEP=$WORK/keep
mkdir -p $WORK $KEEP
# Timing lines every 2 s, to match them with the scenarios' start times printed by serve.py.
PROFILE=(--server-env EXECUTOR_PROFILE_SECONDS=2)
DTYPES=()
[ -n "${KV:-}" ] && DTYPES+=(--kv-cache-dtype "$KV")
[ -n "${WEIGHTS:-}" ] && DTYPES+=(--weights-dtype "$WEIGHTS")
if [ "${SKIP_2B:-0}" != 1 ]; then
# Scenarios by importance (saved after each: a step cut short keeps what it did). ws1 costs ~15 s.
step 230 "serve 2b" python3 bench/serve.py --model 2b --concurrency 32,64 --rounds 3 \
  --scenarios executor,ws,followup,arriving,ws1,openai \
  --followup-concurrency 1,16 --followup-rounds 4 --arrive 32,16,1.0,4 "${PROFILE[@]}" "${DTYPES[@]}" \
  --workdir $WORK/2b --out "$OUT/serve-2b.json"
keep_logs 2b
step 30 "plot 2b" python3 bench/plot_serve.py --out "$OUT/serve-2b.png" \
  2026-11-30=bench/results/h200-2026-11-30-run2/serve-2b.json now="$OUT/serve-2b.json"
# `BASE=DIR`: the same 2B measurements (in process, WebSocket, arriving pictures, the c=1
# follow-up) from another tree, e.g. the commit before a change (`git archive REV` into DIR,
# carried with this one), in the same run on the same GPU, so the two are compared side by side.
# A tree from before --client-processes runs its clients in one process: its ws compares with
# this run's ws1. `BASE_ENV=SECTION_KEY=value` sets a config key for the base's server, e.g.
# `BASE=. BASE_ENV=EXECUTOR_STREAM_INTERVAL=0.05`: this tree with another setting, side by side.
if [ -n "${BASE:-}" ]; then
  BASE_ARGS=()
  [ -n "${BASE_ENV:-}" ] && BASE_ARGS=(--server-env "$BASE_ENV")
  step 200 "serve 2b, base tree${BASE_ENV:+ with $BASE_ENV}" bash -c "cd '$BASE' && python3 bench/serve.py --model 2b \
    --concurrency 32,64 --rounds 3 --scenarios executor,ws,arriving,followup,openai --arrive 32,16,1.0,4 \
    --followup-concurrency 1 --followup-rounds 4 ${PROFILE[*]} ${BASE_ARGS[*]} --workdir $WORK/2b-base \
    --out '$OUT/serve-2b-base.json'"
  keep_logs 2b-base
  step 30 "plot 2b against base" python3 bench/plot_serve.py --out "$OUT/serve-2b.png" \
    base="$OUT/serve-2b-base.json" now="$OUT/serve-2b.json"
fi
if [ "${GPU_CHECK:-0}" = 1 ]; then
  step 100 "gpu_check 2b" python3 bench/gpu_check.py --model 2b --out "$OUT/gpu_check-2b.json"
elif [ "${TF:-1}" = 1 ]; then
  step 90 "teacher forcing 2b" python3 bench/gpu_check.py --model 2b --teacher-forcing-only "${DTYPES[@]}" \
    --out "$OUT/gpu_check-2b.json"
fi
fi
# Picture preparation alone (bench/prepare.py): 8 threads like the server's picture pool, then
# with one more thread spinning in Python (the worker and the event loop want the GIL too).
if [ "${PREPARE:-1}" = 1 ]; then
step 45 "prepare" python3 bench/prepare.py --device cuda --threads 8 --pictures 48 --out "$OUT/prepare.json"
step 45 "prepare, busy" python3 bench/prepare.py --device cuda --threads 8 --pictures 48 --busy \
  --out "$OUT/prepare-busy.json"
# The same with the pictures decoded in 8 worker processes (executor.prepare_processes; the
# server's default on 16 cores): what the server's GIL no longer does.
step 45 "prepare, processes" python3 bench/prepare.py --device cuda --threads 8 --processes 8 --pictures 48 \
  --out "$WORK/prepare-processes.json"
step 45 "prepare, processes, busy" python3 bench/prepare.py --device cuda --threads 8 --processes 8 \
  --pictures 48 --busy --out "$WORK/prepare-processes-busy.json"
cp "$WORK"/prepare-processes*.json "$KEEP"/ 2>/dev/null && tar -czf "$OUT/logs.tar.gz" -C "$KEEP" . 2>/dev/null
fi
if [ "${ONLY_2B:-0}" != 1 ]; then
  step 180 "serve 8b" python3 bench/serve.py --model 8b --weights memory --concurrency 64 --rounds 3 \
    --scenarios executor,ws "${PROFILE[@]}" "${DTYPES[@]}" --workdir $WORK/8b --out "$OUT/serve-8b.json"
  keep_logs 8b
  step 160 "serve 30b-a3b" python3 bench/serve.py --model 30b-a3b --weights memory --concurrency 64 --rounds 3 \
    --scenarios executor,ws "${PROFILE[@]}" "${DTYPES[@]}" --workdir $WORK/30b-a3b --out "$OUT/serve-30b-a3b.json"
  keep_logs 30b-a3b
fi
# `KERNELS=1`: where the GPU time goes, by kernel (bench/profile_prefill.py): the vision encoder
# and packed forward for 1 and 4 pictures, and the decode step at 64 rows of ~1100 tokens, for
# each model of KERNEL_MODELS (default 2b; e.g. "2b 8b 30b-a3b").
if [ "${KERNELS:-0}" = 1 ]; then
  for model in ${KERNEL_MODELS:-2b}; do
    step 150 "kernels $model" python3 bench/profile_prefill.py --model "$model" --out "$WORK/profile-$model.txt"
    cp "$WORK/profile-$model.txt" "$KEEP/" 2>/dev/null && tar -czf "$OUT/logs.tar.gz" -C "$KEEP" . 2>/dev/null
  done
fi
# `FLOAT8_EXPERTS=1`: 30B-A3B's experts in bf16, float8 W8A16 and W8A8 (bench/float8_experts.py), the
# fastest tiles written into float8_tiles.json (copied back with the logs: commit it).
if [ "${FLOAT8_EXPERTS:-0}" = 1 ]; then
  step 200 "float8 experts" python3 bench/float8_experts.py --write-tiles --out "$OUT/float8-experts.json"
  cp server/inference/model/float8_tiles.json "$KEEP/" && tar -czf "$OUT/logs.tar.gz" -C "$KEEP" . 2>/dev/null
fi
if [ "${PROBE:-0}" = 1 ]; then
  step 90 "prefill probe 2b" python3 bench/prefill_probe.py --model 2b --out "$OUT/probe-2b.json"
fi
date -u | tee -a "$LOG"
