#!/usr/bin/env bash
# Build and run the CPU image without an image registry: the base image is made from Debian's
# packages (mmdebstrap) and imported into podman, then docker/Dockerfile.cpu is built FROM it
# (--build-arg BASE) and started, and the script checks what the image promises: /health through
# the published port, a non-root user, the healthcheck, and a SIGTERM that ends it well within
# the stop grace. Needs root, podman, runc and mmdebstrap (apt-get install podman runc mmdebstrap).
#
#   docker/build-offline.sh [--pip-conf FILE] [--wheels DIR]
#
# --pip-conf: a pip.conf for the build (an index mirror, a CA bundle under /etc/ssl/certs);
# --wheels: a folder of wheels mounted at the same path in the build (e.g. the torch CPU wheel,
#           when the torch index cannot be reached: then also set TORCH_INDEX=https://pypi.org/simple).
set -euo pipefail
cd "$(dirname "$0")/.."

pip_conf="" wheels=""
while [ $# -gt 0 ]; do
  case "$1" in
    --pip-conf) pip_conf=$2; shift 2 ;;
    --wheels) wheels=$2; shift 2 ;;
    *) echo "usage: $0 [--pip-conf FILE] [--wheels DIR]" >&2; exit 2 ;;
  esac
done

base=localhost/vlbridge-base:bookworm
image=localhost/vlbridge:cpu
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# crun refuses cgroup v1/hybrid hosts and podman's default ulimits exceed what an unprivileged
# (no CAP_SYS_RESOURCE) root may set: runc, and limits within the current ones.
nofile=$(ulimit -Hn)
podman=(podman --runtime runc)
limits=(--ulimit "nofile=$nofile:$nofile" --ulimit nproc=4096:4096)

if ! "${podman[@]}" image exists "$base"; then
  echo "== base image: Debian bookworm + python3 (mmdebstrap)"
  mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$work/base.tar"
  "${podman[@]}" import --quiet "$work/base.tar" "$base" >/dev/null
fi

build=(--build-arg "BASE=$base" --network host)
[ -n "${TORCH_INDEX:-}" ] && build+=(--build-arg "TORCH_INDEX=$TORCH_INDEX")
[ -n "$pip_conf" ] && build+=(-v "$(realpath "$pip_conf"):/etc/pip.conf:ro"
  -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
[ -n "$wheels" ] && build+=(-v "$(realpath "$wheels"):$(realpath "$wheels"):ro")
echo "== build docker/Dockerfile.cpu FROM $base"
"${podman[@]}" build --quiet --format docker "${limits[@]}" "${build[@]}" \
  -f docker/Dockerfile.cpu -t "$image" . >/dev/null

echo "== run"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
name=vlbridge-offline-$$
"${podman[@]}" run -d --name "$name" "${limits[@]}" -p "127.0.0.1:$port:8000" \
  -v "$name-data:/data" "$image" >/dev/null
cleanup() { "${podman[@]}" rm -f -v "$name" >/dev/null 2>&1 || true; "${podman[@]}" volume rm -f "$name-data" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

for _ in $(seq 240); do  # the demo model is built on the first start
  curl -fsS "http://127.0.0.1:$port/health" >"$work/health" 2>/dev/null && break
  sleep 1
done
echo "health: $(cat "$work/health")"
grep -q '"status":"healthy"' "$work/health"
answer=$(curl -fsS "http://127.0.0.1:$port/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}')
echo "answer: $answer"
user=$("${podman[@]}" exec "$name" id -un)
echo "user: $user"
[ "$user" = vlbridge ]
"${podman[@]}" healthcheck run "$name" && echo "healthcheck: healthy"

echo "== SIGTERM while an answer streams"
curl -fsSN "http://127.0.0.1:$port/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"messages": [{"role": "user", "content": "a long one"}], "max_tokens": 40, "stream": true}' \
  >"$work/stream" &
streaming=$!
for _ in $(seq 120); do grep -q '"content"' "$work/stream" && break; sleep 0.5; done
grep -q '"content"' "$work/stream"  # the answer has started
start=$(date +%s)
"${podman[@]}" stop --time 30 "$name" >/dev/null
took=$(( $(date +%s) - start ))
wait "$streaming"  # curl fails on a cut stream
code=$("${podman[@]}" inspect "$name" --format '{{.State.ExitCode}}')
echo "stopped in ${took}s (stop_grace_period 30s), exit code $code"
"${podman[@]}" logs "$name" 2>&1 | grep -E 'draining|shutdown|Finished' | tail -n 4
echo "stream ended with: $(grep -o '"finish_reason":"[a-z]*"' "$work/stream" | tail -n 1) $(tail -c 14 "$work/stream" | tr -d '\n')"
grep -Eq '"finish_reason":"(length|stop)"' "$work/stream" && grep -q '\[DONE\]' "$work/stream"
[ "$took" -lt 30 ]
echo "OK: $image built from $base, served, drained an answer on SIGTERM and stopped"
