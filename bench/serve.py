"""Whole-service benchmark: `vlbridge serve` driven by WebSocket and OpenAI clients, closed loop.

    python bench/serve.py --device cpu                       # demo model, small counts, ~1 minute
    python bench/serve.py --model 2b --out $OUT/serve-2b.json   # on a GPU: real 2B architecture

Per concurrency level (c clients, each asking again as soon as its answer is done):
req/s, output tok/s, TTFT p50/p95 (at the client: ask sent -> first `delta`), gap between
deltas p50/p99, latency p50/p95. In the same run, `bench/executor.py` measures the executor in
process on the same checkpoint, pictures and answer length, so the server's overhead is a
ratio (`ws / executor`).

Scenarios (`--scenarios`):
  executor   the in-process executor (bench/executor.py, vlbridge system only), first, on its own
  ws         WebSocket protocol v1 clients; each ask on a fresh context (a `reset` before it)
  openai     streaming POST /v1/chat/completions (SSE) clients
  followup   a picture question, then a text follow-up on the same session: TTFT of each
  arriving   clients streaming long text answers while bursts of new-picture asks arrive:
             inter-token gap p99 of the streaming clients, quiet vs busy

Every ask carries a picture never sent before (except the follow-ups, which carry none), so
caches keyed by picture content do not flatter the closed loop. Random-weight checkpoints get
a tokenizer covering the model's whole vocabulary (bench/architectures.py), so answers stream
token by token as a real model's do; their length is `--new-tokens` unless the model samples
its end-of-answer token first (the tables report the mean answer length).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.executor import GpuBusy, distinct_jpegs, noise_jpeg, pct  # noqa: E402

QUESTION = "Describe this picture in detail."
FOLLOW_UP = "What else can you tell me about it?"


# ---- pictures ---------------------------------------------------------------------------------------


class Pictures:
    """Distinct noise JPEGs (base64), made up front on all cores; `take()` never repeats one."""

    def __init__(self, size: int, count: int) -> None:
        self._items = [
            base64.b64encode(data).decode() for data in distinct_jpegs(size, count, first_seed=1000)
        ]
        self._next = 0
        self.size = size

    def take(self) -> str:
        if self._next >= len(self._items):  # more than planned: make one more (slower, still distinct)
            self._items.append(base64.b64encode(noise_jpeg(self.size, 1000 + len(self._items))).decode())
        item = self._items[self._next]
        self._next += 1
        return item


# ---- one answer, as a client sees it ----------------------------------------------------------------


@dataclass
class Answer:
    sent: float
    first: float | None = None
    done: float | None = None
    deltas: list[float] = field(default_factory=list)  # arrival times
    tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.deltas, self.deltas[1:], strict=False)]


class WsClient:
    """A minimal protocol v1 client: one connection, one ask at a time."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: Any = None
        self._asks = 0

    async def __aenter__(self) -> WsClient:
        from websockets.asyncio.client import connect

        self.conn = await connect(self.url, max_size=None, ping_interval=None, open_timeout=30)
        hello = json.loads(await self.conn.recv())
        assert hello["type"] == "hello", hello
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()

    async def reset(self) -> None:
        await self.conn.send('{"type":"reset"}')

    async def ask(self, text: str, picture: str | None, max_tokens: int) -> Answer:
        self._asks += 1
        ask_id = f"a{self._asks}"
        frame: dict[str, Any] = {"type": "ask", "id": ask_id, "text": text, "max_tokens": max_tokens}
        if picture is not None:
            frame["images"] = [picture]
        answer = Answer(time.monotonic())
        # orjson: one simulated client of many in this process, its 1.3 MB frame serialised in
        # ~0.5 ms (stdlib json: ~2 ms on the event loop all the clients share).
        await self.conn.send(orjson.dumps(frame).decode())
        while True:
            raw = await asyncio.wait_for(self.conn.recv(), 600)
            now = time.monotonic()
            event = orjson.loads(raw)
            kind = event["type"]
            if kind == "ping":
                await self.conn.send(json.dumps({"type": "pong", "ts": event["ts"]}))
            if event.get("id") != ask_id:
                continue
            if kind == "delta":
                answer.first = answer.first or now
                answer.deltas.append(now)
            elif kind == "done":
                answer.done = now
                answer.tokens = int(event["usage"]["completion_tokens"])
                return answer
            elif kind == "error":
                answer.error = f"{event.get('code')}: {event.get('message')}"
                return answer


async def openai_ask(http: Any, base: str, picture: str, max_tokens: int) -> Answer:
    body = {
        "model": "bench",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{picture}"}},
                    {"type": "text", "text": QUESTION},
                ],
            }
        ],
    }
    answer = Answer(time.monotonic())
    async with http.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            answer.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            return answer
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            now = time.monotonic()
            if line == "data: [DONE]":
                answer.done = now
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                answer.error = str(chunk["error"])
            if chunk.get("usage"):
                answer.tokens = int(chunk["usage"]["completion_tokens"])
            for choice in chunk.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    answer.first = answer.first or now
                    answer.deltas.append(now)
    return answer


# ---- summaries --------------------------------------------------------------------------------------


def summarize(answers: list[Answer], started: float | None = None) -> dict[str, Any]:
    """Figures over *answers*; throughput over the window from *started* to the last answer."""
    good = [a for a in answers if a.error is None and a.done is not None]
    errors = [a.error for a in answers if a.error is not None]
    ttft = [t for a in good if (t := a.ttft) is not None]
    gaps = [g for a in good for g in a.gaps]
    result: dict[str, Any] = {
        "requests": len(good),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "tokens_mean": statistics.mean(a.tokens for a in good) if good else 0,
        "deltas_mean": statistics.mean(len(a.deltas) for a in good) if good else 0,
        "deltas_max": max((len(a.deltas) for a in good), default=0),
        "ttft_p50": pct(ttft, 50),
        "ttft_p95": pct(ttft, 95),
        "gap_p50": pct(gaps, 50),
        "gap_p99": pct(gaps, 99),
        "gap_max": max(gaps) if gaps else float("nan"),
        "lat_p50": pct([a.done - a.sent for a in good if a.done], 50),
        "lat_p95": pct([a.done - a.sent for a in good if a.done], 95),
    }
    if started is not None and good:
        window = [a for a in good if a.done and a.done > started]
        wall = max(a.done for a in window if a.done) - started if window else float("nan")
        result["wall"] = wall
        result["rps"] = len(window) / wall if window else 0.0
        result["tok_s"] = sum(a.tokens for a in window) / wall if window else 0.0
    return result


def server_ttft(server: Server) -> tuple[float, int]:
    """Sum and count of the server's own time to first token (submission to the first token on
    the worker thread), over all routes, from /metrics."""
    total, count = 0.0, 0
    with urllib.request.urlopen(f"{server.http}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("vlbridge_time_to_first_token_seconds_sum"):
                total += float(line.rsplit(" ", 1)[1])
            elif line.startswith("vlbridge_time_to_first_token_seconds_count"):
                count += int(float(line.rsplit(" ", 1)[1]))
    return total, count


def split_ttft(result: dict[str, Any], before: tuple[float, int], after: tuple[float, int],
               answers: list[Answer]) -> None:  # fmt: skip
    """Mean TTFT at the client vs inside the server over the same asks: the difference is the
    transport (frame parsing, picture hand-off, relay of the first delta)."""
    ttft = [t for a in answers if a.error is None and (t := a.ttft) is not None]
    count = after[1] - before[1]
    if ttft and count:
        result["ttft_mean"] = statistics.mean(ttft)
        result["server_ttft_mean"] = (after[0] - before[0]) / count


# ---- scenarios --------------------------------------------------------------------------------------


async def closed_loop(
    kind: str, server: Server, pictures: Pictures, c: int, requests: int, tokens: int
) -> dict:
    """c clients, each asking again when answered; the first answer of each is warm-up."""
    import httpx

    answers: list[Answer] = []
    first_wave: list[float] = []
    everything: list[Answer] = []  # the first wave too: the server's TTFT figures count it

    def keep(number: int, answer: Answer) -> None:
        everything.append(answer)
        (answers.append(answer) if number else first_wave.append(answer.done or time.monotonic()))

    async def ws_client() -> None:
        async with WsClient(server.ws) as client:
            for number in range(per_client):
                await client.reset()
                keep(number, await client.ask(QUESTION, pictures.take(), tokens))

    async def openai_client(http: httpx.AsyncClient) -> None:
        for number in range(per_client):
            keep(number, await openai_ask(http, server.http, pictures.take(), tokens))

    per_client = 1 + max(1, -(-requests // c))
    before = server_ttft(server)
    with GpuBusy() as busy:
        if kind == "ws":
            await asyncio.gather(*[ws_client() for _ in range(c)])
        else:
            limits = httpx.Limits(max_connections=c + 4, max_keepalive_connections=c + 4)
            async with httpx.AsyncClient(limits=limits) as http:
                await asyncio.gather(*[openai_client(http) for _ in range(c)])
    # Steady state: from the median completion of the first wave (it arrives all at once).
    result = summarize(answers, statistics.median(first_wave))
    result["gpu_busy"] = busy.fraction
    split_ttft(result, before, server_ttft(server), everything)
    return result


async def followup(server: Server, pictures: Pictures, c: int, rounds: int, tokens: int) -> dict:
    """Each client: a question with a new picture, then a text follow-up on the same conversation."""
    first: list[Answer] = []
    second: list[Answer] = []
    inside: dict[str, list[float]] = {"first": [], "followup": []}  # c=1: the server's own TTFT

    async def ask(ws: WsClient, text: str, picture: str | None, kind: str) -> Answer:
        before = server_ttft(server) if c == 1 else None
        answer = await ws.ask(text, picture, tokens)
        if before is not None:
            after = server_ttft(server)
            if after[1] == before[1] + 1:
                inside[kind].append(after[0] - before[0])
        return answer

    async def client() -> None:
        async with WsClient(server.ws) as ws:
            for number in range(rounds + 1):
                await ws.reset()
                a = await ask(ws, QUESTION, pictures.take(), "first")
                b = await ask(ws, FOLLOW_UP, None, "followup")
                if number:  # the first round warms up
                    first.append(a)
                    second.append(b)

    await asyncio.gather(*[client() for _ in range(c)])
    one, two = summarize(first), summarize(second)
    for kind, summary in (("first", one), ("followup", two)):
        if inside[kind][1:]:
            summary["server_ttft_p50"] = pct(inside[kind][1:], 50)  # the warm-up round left out
    return {
        "rounds": len(first),
        "first": one,
        "followup": two,
        "ttft_ratio": two["ttft_p50"] / one["ttft_p50"] if one["requests"] and two["requests"] else None,
    }


async def arriving(
    server: Server, pictures: Pictures, streamers: int, burst: int, every: float, seconds: float, tokens: int
) -> dict:
    """*streamers* clients stream text answers (follow-ups about a picture); after a quiet phase
    of *seconds*, a burst of *burst* new-picture asks arrives every *every* seconds for as long.
    A gap between two deltas of a streamer belongs to the phase in which it ended."""
    answers: list[Answer] = []
    arrivals: list[Answer] = []
    ready = 0
    all_ready = asyncio.Event()
    stop = asyncio.Event()

    async def streamer() -> None:
        nonlocal ready
        async with WsClient(server.ws) as ws:
            await ws.ask(QUESTION, pictures.take(), 8)  # a picture in context: follow-ups are long prompts
            ready += 1
            if ready == streamers:
                all_ready.set()
            while not stop.is_set():
                answers.append(await ws.ask(FOLLOW_UP, None, tokens))

    async def arrival() -> None:
        async with WsClient(server.ws) as ws:
            arrivals.append(await ws.ask(QUESTION, pictures.take(), 16))

    tasks = [asyncio.create_task(streamer()) for _ in range(streamers)]
    await asyncio.wait_for(all_ready.wait(), 600)
    quiet = time.monotonic()
    await asyncio.sleep(seconds)
    busy = time.monotonic()
    bursts: list[asyncio.Task[None]] = []
    while time.monotonic() < busy + seconds:
        bursts.extend(asyncio.create_task(arrival()) for _ in range(burst))
        await asyncio.sleep(every)
    end = time.monotonic()
    stop.set()
    await asyncio.gather(*tasks, *bursts)

    def gaps(low: float, high: float) -> dict[str, float]:
        found = [
            b - a
            for answer in answers
            for a, b in zip(answer.deltas, answer.deltas[1:], strict=False)
            if low <= b < high
        ]
        return {"gaps": len(found), "gap_p50": pct(found, 50), "gap_p99": pct(found, 99),
                "gap_max": max(found, default=float("nan"))}  # fmt: skip

    return {
        "streamers": streamers,
        "burst": burst,
        "every_s": every,
        "quiet": gaps(quiet, busy),
        "busy": gaps(busy, end),
        "streamed": summarize(answers),
        "arrivals": summarize(arrivals),
    }


# ---- the server and the in-process figure -----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """`vlbridge serve` in a child process, on a port picked now; its log goes to *log*."""

    def __init__(self, model_dir: str, args: argparse.Namespace, max_batch: int, log: Path) -> None:
        self.port = free_port()
        self.http = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}/ws"
        # Weights built in memory: the service is pointed at the demo checkpoint, whose folder its
        # start-up checks accept (an architecture's name is no folder); serve_random.py's loader
        # builds the named architecture instead of reading it.
        path = str(args.demo_dir) if args.weights == "memory" else model_dir
        env = {
            **os.environ,
            "VLBRIDGE_MODEL_PATH": path,
            "VLBRIDGE_MODEL_DEVICE": args.device,
            "VLBRIDGE_MODEL_DTYPE": args.dtype,
            "VLBRIDGE_MODEL_MAX_NEW_TOKENS": str(max(args.new_tokens, 256)),
            "VLBRIDGE_MODEL_MAX_PIXELS": str(max(args.image_size**2, 32 * 32 * 4)),
            "VLBRIDGE_SERVER_PORT": str(self.port),
            "VLBRIDGE_SERVER_HOST": "127.0.0.1",
            "VLBRIDGE_EXECUTOR_MAX_BATCH": str(max_batch),
            "VLBRIDGE_EXECUTOR_QUEUE_SIZE": "4096",
            "VLBRIDGE_STORAGE_PATH": tempfile.mkdtemp(prefix="vlbridge-serve-bench-"),
            **{f"VLBRIDGE_{k.upper()}": v for k, v in (s.split("=", 1) for s in args.server_env)},
        }
        self.log = log.open("w")
        started = time.monotonic()
        command = [sys.executable, "-m", "server.cli", "serve"]
        if args.weights == "memory":  # model_dir is the architecture's name
            command = [sys.executable, str(ROOT / "bench" / "serve_random.py"), model_dir, str(args.demo_dir)]
        self.proc = subprocess.Popen(
            command,
            env=env,
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vlbridge serve exited with {self.proc.returncode}; see {log}")
            if time.monotonic() - started > 600:
                raise RuntimeError("vlbridge serve was not healthy within 600 s")
            try:
                with urllib.request.urlopen(f"{self.http}/health", timeout=2) as response:
                    if json.loads(response.read())["status"] == "healthy":
                        break
            except Exception:  # 503 while loading, refused before listening
                pass
            time.sleep(0.2)
        self.start_s = time.monotonic() - started

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def executor_figures(model_dir: str, args: argparse.Namespace, levels: list[int], work: Path) -> dict:
    """bench/executor.py's in-process executor on the same checkpoint, in a child process (it
    frees the GPU when it exits, before the server loads the model)."""
    out = work / "executor.json"
    command = [
        sys.executable,
        str(ROOT / "bench" / "executor.py"),
        "--model", model_dir, "--device", args.device, "--dtype", args.dtype,
        "--systems", "vlbridge", "--concurrency", ",".join(map(str, levels)),
        "--new-tokens", str(args.new_tokens), "--image-size", str(args.image_size),
        "--rounds", str(args.rounds), "--workdir", str(work / "executor"), "--out", str(out),
    ]  # fmt: skip
    if args.weights == "memory":
        command.append("--in-memory")
    done = subprocess.run(command, check=False, cwd=ROOT)
    # bench/executor.py saves after every level: figures it wrote before a bad exit still hold.
    figures = json.loads(out.read_text())["results"]["vlbridge"] if out.exists() else {}
    if done.returncode != 0:
        print(f"bench/executor.py exited with {done.returncode} after {len(figures)} levels", flush=True)
        if not figures:
            raise subprocess.CalledProcessError(done.returncode, command)
    return {int(c): r for c, r in figures.items()}


# ---- main -------------------------------------------------------------------------------------------


def requests(c: int, rounds: float) -> int:
    """Measured requests at concurrency *c* (as bench/executor.py counts them)."""
    return max(c, int(c * rounds)) if c > 1 else max(3, int(rounds * 2))


def build_model(args: argparse.Namespace, work: Path) -> tuple[str, str]:
    from server.inference.model.demo import build_demo_model

    if Path(args.model).is_dir():
        return args.model, "checkpoint"
    demo = build_demo_model(work / "demo")
    if args.model == "demo":
        return str(demo), "demo (random)"
    if args.weights == "memory":
        args.demo_dir = demo
        return args.model, "RANDOM (real architecture, meaningless answers), built in memory"
    from bench.architectures import build_checkpoint

    target = work / args.model
    build_checkpoint(args.model, target, demo, args.dtype)
    return str(target), "RANDOM (real architecture, meaningless answers), full-vocabulary tokenizer"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="demo", help="demo | 2b | 8b | 30b-a3b | a checkpoint directory")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--concurrency", default=None, help="comma list (default 1,32,64; cpu: 1,4)")
    parser.add_argument("--openai-concurrency", default=None, help="comma list (default: the largest level)")
    parser.add_argument("--scenarios", default="executor,ws,openai,followup,arriving")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128 (cpu: 16)")
    parser.add_argument("--image-size", type=int, default=None, help="default 1024 (cpu: 224)")
    parser.add_argument("--rounds", type=float, default=4.0, help="measured requests per client per level")
    parser.add_argument("--followup-concurrency", default="1,8", help="comma list")
    parser.add_argument("--followup-rounds", type=int, default=4)
    parser.add_argument("--arrive", default="16,16,1.0,4", help="streamers,burst,every_s,phase_s")
    parser.add_argument(
        "--weights",
        choices=("checkpoint", "memory"),
        default="checkpoint",
        help="random weights of an architecture: written as a checkpoint, or built in GPU memory "
        "by the server and the in-process executor alike (30B-A3B does not fit on the disk)",
    )
    parser.add_argument("--server-env", action="append", default=[], help="SECTION_KEY=value for the server")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None, help="write results as JSON here")
    args = parser.parse_args(argv)

    cpu = args.device == "cpu"
    levels = [int(c) for c in (args.concurrency or ("1,4" if cpu else "1,32,64")).split(",")]
    openai_levels = [int(c) for c in (args.openai_concurrency or str(max(levels))).split(",") if c]
    follow_levels = [int(c) for c in args.followup_concurrency.split(",") if c]
    args.new_tokens = args.new_tokens or (16 if cpu else 128)
    args.image_size = args.image_size or (224 if cpu else 1024)
    args.dtype = args.dtype or ("float32" if cpu else "bfloat16")
    streamers, burst, every, phase_s = (float(x) for x in args.arrive.split(","))
    scenarios = args.scenarios.split(",")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vlbridge-serve-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    planned = sum(requests(c, args.rounds) + 2 * c for c in levels) * ("ws" in scenarios)
    planned += sum(requests(c, args.rounds) + 2 * c for c in openai_levels) * ("openai" in scenarios)
    planned += sum(c * (args.followup_rounds + 1) for c in follow_levels) * ("followup" in scenarios)
    planned += int(streamers + burst * phase_s / every + burst) * ("arriving" in scenarios)
    pictures = Pictures(args.image_size, planned)  # before torch is imported: the pool forks

    model_dir, weights = build_model(args, work)
    info: dict[str, Any] = {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "new_tokens": args.new_tokens,
        "image": f"{args.image_size}x{args.image_size} JPEG noise, a new one per ask",
        "weights": weights,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "host": platform.node(),
        "server_env": args.server_env,
    }
    results: dict[str, Any] = {"info": info, "executor": {}, "ws": {}, "openai": {}, "followup": {}}

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1, default=str))

    if "executor" in scenarios:
        try:
            results["executor"] = executor_figures(model_dir, args, levels, work)
        except subprocess.CalledProcessError as exc:  # the service's figures are still worth having
            results["executor_error"] = str(exc)
        save()
    server = Server(
        model_dir, args, max(levels + openai_levels + [int(streamers + burst * 4)]), work / "serve.log"
    )
    info["server_start_s"] = round(server.start_s, 1)
    print(json.dumps(info), flush=True)
    try:
        run_scenarios(server, pictures, args, scenarios, results, save, levels, openai_levels, follow_levels)
    finally:
        server.close()
    # The server's own timing lines (server/inference/profile.py), to match with the scenarios'
    # start times printed above.
    results["profile"] = [line.rstrip() for line in (work / "serve.log").open() if "vlbridge.profile" in line]
    print("\n".join(results["profile"]))
    print_tables(results, levels)
    save()
    return results


def run_scenarios(
    server: Server,
    pictures: Pictures,
    args: argparse.Namespace,
    scenarios: list[str],
    results: dict[str, Any],
    save: Any,
    levels: list[int],
    openai_levels: list[int],
    follow_levels: list[int],
) -> None:
    """Each scenario in turn; one that fails is recorded and the next one still runs."""
    streamers, burst, every, phase_s = (float(x) for x in args.arrive.split(","))

    def attempt(name: str, run: Any) -> Any:
        print(f"--- {name} starts at {time.strftime('%H:%M:%S')}", flush=True)
        try:
            return run()
        except Exception as exc:
            print(f"{name} failed: {exc!r}", flush=True)
            return {"error": repr(exc)}

    for kind, kind_levels in (("ws", levels), ("openai", openai_levels)):
        if kind not in scenarios:
            continue
        for c in kind_levels:
            attempt(
                "warm-up",
                lambda: asyncio.run(closed_loop(kind, server, pictures, min(c, 2), 2, args.new_tokens)),
            )
            results[kind][c] = attempt(
                kind,
                lambda: asyncio.run(
                    closed_loop(kind, server, pictures, c, requests(c, args.rounds), args.new_tokens)
                ),
            )
            print(kind, c, json.dumps(results[kind][c]), flush=True)
            save()
    if "followup" in scenarios:
        for c in follow_levels:
            results["followup"][c] = attempt(
                "followup",
                lambda: asyncio.run(followup(server, pictures, c, args.followup_rounds, args.new_tokens)),
            )
            print("followup", c, json.dumps(results["followup"][c]), flush=True)
            save()
    if "arriving" in scenarios:
        results["arriving"] = attempt(
            "arriving",
            lambda: asyncio.run(
                arriving(server, pictures, int(streamers), int(burst), every, phase_s, args.new_tokens)
            ),
        )
        print("arriving", json.dumps(results["arriving"]), flush=True)
        save()


def _ms(value: float | None) -> str:
    return "-" if value is None or value != value else f"{1000 * value:.0f}"


def print_tables(results: dict[str, Any], levels: list[int]) -> None:
    info = results["info"]
    print(
        f"\n{info['model']} on {info['device']}, {info['dtype']}, {info['image']}, "
        f"max {info['new_tokens']} new tokens, weights {info['weights']}"
    )
    header = ("system", "conc", "req/s", "tok/s", "tokens", "TTFT p50/p95 ms", "gap p50/p99 ms",
              "lat p50/p95 ms", "GPU busy", "x executor")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    executor = {int(k): v for k, v in results["executor"].items()}
    for c in sorted({*levels, *map(int, results["openai"])}):
        base = executor.get(c)
        if base and base.get("rps"):
            print(
                f"| executor | {c} | {base['rps']:.2f} | {base['tok_s']:.0f} | {info['new_tokens']} | "
                f"{_ms(base['ttft_p50'])}/{_ms(base['ttft_p95'])} | - | "
                f"{_ms(base['lat_p50'])}/{_ms(base['lat_p95'])} | {base.get('gpu_busy') or '-'} | 1 |"
            )
        for kind in ("ws", "openai"):
            r = results[kind].get(c)
            if not r or "rps" not in r:
                continue
            ratio = f"{r['rps'] / base['rps']:.2f}" if base and base.get("rps") else "-"
            busy = f"{r['gpu_busy']:.0%}" if r.get("gpu_busy") is not None else "-"
            print(
                f"| {kind} | {c} | {r['rps']:.2f} | {r['tok_s']:.0f} | {r['tokens_mean']:.0f} | "
                f"{_ms(r['ttft_p50'])}/{_ms(r['ttft_p95'])} | {_ms(r['gap_p50'])}/{_ms(r['gap_p99'])} | "
                f"{_ms(r['lat_p50'])}/{_ms(r['lat_p95'])} | {busy} | {ratio} |"
            )
    for kind in ("ws", "openai"):
        for c, r in results[kind].items():
            if r.get("server_ttft_mean") is not None:
                print(
                    f"{kind} c={c}: TTFT mean at the client {_ms(r['ttft_mean'])} ms, inside the server "
                    f"(submission to first token) {_ms(r['server_ttft_mean'])} ms"
                )
    for c, r in results["followup"].items():
        if "first" not in r:
            continue
        if "server_ttft_p50" in r["followup"]:
            print(
                f"follow-up c={c}: TTFT p50 inside the server: first question "
                f"{_ms(r['first'].get('server_ttft_p50'))} ms, "
                f"follow-up {_ms(r['followup']['server_ttft_p50'])} ms"
            )
        print(
            f"follow-up c={c}: TTFT p50 first question {_ms(r['first']['ttft_p50'])} ms, "
            f"text follow-up {_ms(r['followup']['ttft_p50'])} ms (p95 {_ms(r['first']['ttft_p95'])} / "
            f"{_ms(r['followup']['ttft_p95'])})"
        )
    if "quiet" in results.get("arriving", {}):
        r = results["arriving"]
        print(
            f"arriving: {r['streamers']} streaming clients; gap p50/p99/max quiet "
            f"{_ms(r['quiet']['gap_p50'])}/{_ms(r['quiet']['gap_p99'])}/{_ms(r['quiet']['gap_max'])} ms, "
            f"with a burst of {r['burst']} new pictures every {r['every_s']} s "
            f"{_ms(r['busy']['gap_p50'])}/{_ms(r['busy']['gap_p99'])}/{_ms(r['busy']['gap_max'])} ms; "
            f"arrivals' TTFT p50 {_ms(r['arrivals']['ttft_p50'])} ms"
        )


if __name__ == "__main__":
    main()
