#!/usr/bin/env bash
# Who holds the server's GIL under load: bench/serve.py drives `vlbridge serve` (2B, WebSocket
# clients at c=64, then new pictures arriving beside streaming answers) while py-spy samples the
# server for SECONDS with --gil (only the thread holding the GIL is recorded), once per scenario.
#   bash bench/server_gil.sh OUT_DIR [SECONDS]
# py-spy travels as a wheel in .whl/ like the other dependencies (bench/gpu_wheels.sh); the
# folded stacks land in OUT_DIR/gil-*.txt and a summary per thread and function in
# OUT_DIR/gil-summary.txt (bench/gil_summary.py). Meanwhile `top` records the CPU of the server's
# threads and of the machine's busiest processes (OUT_DIR/top-*.txt): is a thread short of the GIL
# or of a core? Everything is also packed into OUT_DIR/gil.tar.gz (the device tool brings back
# at most 8 files of a call).
set -u
out=$1
seconds=${2:-6}
mkdir -p "$out"
log=$out/serve-gil.log
python3 bench/serve.py --model 2b --concurrency 64 --rounds 4 --scenarios ws,arriving --arrive 32,16,1.0,6 \
  --server-env EXECUTOR_PROFILE_SECONDS=2 --workdir /tmp/vlbridge-gil --out "$out/serve-gil.json" >"$log" 2>&1 &
bench=$!
sample() {  # sample NAME MARKER: once MARKER is in the log, record SECONDS of the server
  local name=$1 marker=$2
  until grep -q -- "$marker" "$log" 2>/dev/null; do
    kill -0 $bench 2>/dev/null || return
    sleep 0.5
  done
  sleep 1.5  # past the scenario's first wave
  local pid
  pid=$(pgrep -f "server.cli serve" | head -1)
  [ -n "$pid" ] || return
  top -H -b -d "$seconds" -n 2 -p "$pid" 2>&1 | awk '/^top -/{n++} n==2' | head -n 40 >"$out/top-$name.txt" &
  local threads=$!
  top -b -d "$seconds" -n 2 2>&1 | awk '/^top -/{n++} n==2' | head -n 30 >"$out/top-$name-machine.txt" &
  local machine=$!
  py-spy record --pid "$pid" --duration "$seconds" --gil --threads --nonblocking \
    --format raw -o "$out/gil-$name.txt" >"$out/gil-$name.log" 2>&1
  wait $threads $machine
}
sample ws "--- ws starts"
sample arriving "--- arriving starts"
wait $bench
python3 bench/gil_summary.py "$out"/gil-*.txt >"$out/gil-summary.txt" 2>&1
tail -n 25 "$log"
cat "$out/gil-summary.txt"
grep -h "websocket over\|relay over" /tmp/vlbridge-gil/serve.log 2>/dev/null | tail -n 12
head -n 30 "$out"/top-ws*.txt
grep -h "vlbridge.profile" /tmp/vlbridge-gil/serve.log >"$out/serve-gil-profile.log" 2>/dev/null
tar -czf "$out/gil.tar.gz" -C "$out" --exclude gil.tar.gz . 2>/dev/null
