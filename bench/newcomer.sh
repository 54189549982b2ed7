#!/usr/bin/env bash
# What a newcomer does, timed: a fresh clone, the README's `make run` (in the background, on a free
# port), wait for /health, `vlbridge chat` about the shipped sample picture through the venv,
# check that an answer arrives, then stop the service with SIGTERM.
#
#   bench/newcomer.sh [REPOSITORY [BRANCH]]     # default: this checkout and its current branch
#
# Slow (the first `make run` creates .venv and installs torch and the project): not part of
# `make test`. Exit status 0 when every step worked. Env: NEWCOMER_DEADLINE (s, default 1800) for
# the install and start, NEWCOMER_KEEP=1 keeps the temporary folder.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
repo="${1:-$here}"
branch="${2:-$(git -C "$here" rev-parse --abbrev-ref HEAD)}"
deadline="${NEWCOMER_DEADLINE:-1800}"
work="$(mktemp -d)"
server=""

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
say() { printf '[newcomer %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

cleanup() {
  if [ -n "$server" ] && kill -0 "$server" 2>/dev/null; then
    kill -TERM -- "-$server" 2>/dev/null || true
  fi
  if [ "${NEWCOMER_KEEP:-0}" = 1 ]; then say "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

fail() {
  say "FAILED: $*"
  if [ -f "$work/run.log" ]; then say "last lines of make run:"; tail -n 25 "$work/run.log"; fi
  exit 1
}

start=$(now)
say "git clone $repo (branch $branch) into $work/vlbridge"
git clone --quiet --branch "$branch" "$repo" "$work/vlbridge"
cd "$work/vlbridge"
say "cloned in $(since "$start") s at $(git log -1 --format='%h %s' | cut -c1-80)"

port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
say "make run PORT=$port (log: $work/run.log)"
started=$(now)
# Its own process group, so that SIGTERM reaches make and the service as Ctrl-C would.
setsid make run PORT="$port" >"$work/run.log" 2>&1 &
server=$!

health="http://127.0.0.1:$port/health"
until curl -sf -o "$work/health.json" "$health"; do
  kill -0 "$server" 2>/dev/null || fail "make run exited before /health answered"
  [ "$(awk -v a="$started" -v b="$(now)" 'BEGIN { print (b - a > 0 ? int(b - a) : 0) }')" -lt "$deadline" ] \
    || fail "no healthy /health within $deadline s"
  sleep 2
done
ready=$(since "$started")
say "/health answered 200 after $ready s: $(head -c 160 "$work/health.json")"
grep -m1 -E "torch: the (CPU|CUDA) build" "$work/run.log" | sed 's/^/[newcomer]   /' || true

asked=$(now)
set +e
.venv/bin/vlbridge chat --url "ws://127.0.0.1:$port/ws" --image examples/sample.png \
  "what is in this picture?" >"$work/answer.txt" 2>"$work/chat.err"
status=$?
set -e
answered=$(since "$asked")
say "vlbridge chat exited $status after $answered s; stderr: $(tr '\n' ' ' <"$work/chat.err" | tail -c 200)"
say "answer ($(wc -c <"$work/answer.txt") bytes): $(head -c 200 "$work/answer.txt" | tr '\n' ' ')"
[ "$status" -eq 0 ] || fail "vlbridge chat exited $status"
[ -s "$work/answer.txt" ] || fail "the answer is empty"

stopping=$(now)
kill -TERM -- "-$server"
set +e
wait "$server"
make_status=$?
set -e
server=""
# make ends at once; the service drains, then closes its port.
for _ in $(seq 120); do
  curl -s -o /dev/null --max-time 2 "$health" || break
  sleep 0.5
done
curl -s -o /dev/null --max-time 2 "$health" && fail "the service still answers 60 s after SIGTERM"
stopped=$(since "$stopping")
say "SIGTERM: the port closed after $stopped s (make: status $make_status); the service's last lines:"
grep -v "^make: " "$work/run.log" | tail -n 3 | sed 's/^/[newcomer]   /'

say "OK: clone + install + start $ready s, answer $answered s, stop $stopped s, total $(since "$start") s"
