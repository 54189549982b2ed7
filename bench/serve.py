"""Whole-service benchmark: `vlbridge serve` driven by WebSocket and OpenAI clients, closed loop.

    python bench/serve.py --device cpu                       # demo model, small counts, ~1 minute
    python bench/serve.py --model 2b --out $OUT/serve-2b.json   # on a GPU: real 2B architecture

Per concurrency level (c clients, each asking again as soon as its answer is done):
req/s, output tok/s, TTFT p50/p95 (at the client: ask sent -> first `delta`), gap between
deltas p50/p99, latency p50/p95. In the same run, `bench/executor.py` measures the executor in
process on the same checkpoint, pictures and answer length, so the server's overhead is a
ratio (`ws / executor`).

Scenarios (`--scenarios`, run in the order given; executor always first):
  executor   the in-process executor (bench/executor.py, vlbridge system only), first, on its own
  ws         WebSocket protocol v1 clients; each ask on a fresh context (a `reset` before it)
  ws1        opt-in: ws with all its clients in this process's one event loop (the way before
             --client-processes), at the same levels: what the load generator's own CPU adds
  openai     streaming POST /v1/chat/completions (SSE) clients
  followup   a picture question, then a text follow-up on the same session: TTFT of each
  arriving   clients streaming long text answers while bursts of new-picture asks arrive:
             inter-token gap p99 of the streaming clients, quiet vs busy

The clients of ws, openai and arriving run in `--client-processes` worker processes
(bench/serve_clients.py), so that serialising, masking and writing 32-64 picture frames at once,
and parsing every delta, does not queue in one event loop and count as the server's time; in
arriving the streamers and the arrivals never share a process. Warm-ups and followup run in
this process. The figures are computed here, over the answers the workers send back.

Every ask carries a picture never sent before (except the follow-ups, which carry none), so
caches keyed by picture content do not flatter the closed loop. Random-weight checkpoints get
a tokenizer covering the model's whole vocabulary (bench/architectures.py), so answers stream
token by token as a real model's do; their length is `--new-tokens` unless the model samples
its end-of-answer token first (the tables report the mean answer length).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.executor import GpuBusy, pct  # noqa: E402
from bench.serve_clients import (  # noqa: E402
    ARRIVAL_TOKENS,
    FOLLOW_UP,
    QUESTION,
    Answer,
    Group,
    Pictures,
    Role,
    WsClient,
    burst_offsets,
    run_clients,
    split,
)

SCENARIOS = ("executor", "ws", "ws1", "openai", "followup", "arriving")

# ---- summaries --------------------------------------------------------------------------------------


def summarize(answers: list[Answer], started: float | None = None) -> dict[str, Any]:
    """Figures over *answers*; throughput over the window from *started* to the last answer."""
    good = [a for a in answers if a.error is None and a.done is not None]
    errors = [a.error for a in answers if a.error is not None]
    ttft = [t for a in good if (t := a.ttft) is not None]
    # ask sent -> the server's first frame about it: upload, parsing and submission, and back
    accept = [a.accepted - a.sent for a in good if a.accepted is not None]
    upload = [a.uploaded - a.sent for a in good if a.uploaded is not None]  # of which the sending
    gaps = [g for a in good for g in a.gaps]
    # What the client waits beyond the server's own times (WebSocket `done` carries them): before
    # the submission plus the relay back, of the first text and of the end. Equal when the first
    # text travels like any other frame.
    outside_first = [
        t - a.server_first for a in good if (t := a.ttft) is not None and a.server_first is not None
    ]
    outside_done = [a.done - a.sent - a.server_total for a in good if a.done and a.server_total is not None]
    # `started` is handed over with the first token's text (after the prefill's tokens): a gap
    # between the two at the client is tokens without text of their own
    started_first = [a.first - a.started for a in good if a.first is not None and a.started is not None]
    result: dict[str, Any] = {
        "requests": len(good),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "tokens_mean": statistics.mean(a.tokens for a in good) if good else 0,
        "deltas_mean": statistics.mean(len(a.deltas) for a in good) if good else 0,
        "deltas_max": max((len(a.deltas) for a in good), default=0),
        "ttft_p50": pct(ttft, 50),
        "ttft_p95": pct(ttft, 95),
        "accept_p50": pct(accept, 50),
        "accept_p95": pct(accept, 95),
        "upload_p50": pct(upload, 50),
        "upload_p95": pct(upload, 95),
        "gap_p50": pct(gaps, 50),
        "gap_p99": pct(gaps, 99),
        "gap_max": max(gaps) if gaps else float("nan"),
        "lat_p50": pct([a.done - a.sent for a in good if a.done], 50),
        "lat_p95": pct([a.done - a.sent for a in good if a.done], 95),
    }
    if outside_first and outside_done:
        result["outside_first_p50"] = pct(outside_first, 50)
        result["outside_done_p50"] = pct(outside_done, 50)
        result["started_first_p50"] = pct(started_first, 50)
    # The server's own TTFT in two: submission to joining the batch (preparation, then the queue),
    # and from there to the first token (the prefill and its sampling)
    split = [
        (a.server_queued, a.server_first) for a in good if a.server_queued is not None and a.server_first
    ]
    if split:
        result["server_queued_p50"] = pct([queued for queued, _ in split], 50)
        result["server_prefill_p50"] = pct([first - queued for queued, first in split], 50)
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


def client_processes(option: str, clients: int, cpu: bool) -> int:
    """Worker processes for *clients* simulated clients (1: in this process's event loop).

    auto: at most 8 clients a process, at most `os.cpu_count() - 2` processes (cores left to the
    server); 1 on the CPU device, where the model itself needs the cores."""
    if option != "auto":
        return max(1, min(int(option), clients))
    if cpu:
        return 1
    return max(1, min(-(-clients // 8), (os.cpu_count() or 1) - 2))


def asks_per_client(c: int, requests: int) -> int:
    """A closed-loop client's asks: the warm-up (the first wave), then its share of *requests*."""
    return 1 + max(1, -(-requests // c))


async def closed_loop(
    kind: Role, server: Server, pictures: Pictures, c: int, requests: int, tokens: int, processes: int
) -> dict[str, Any]:
    """c clients over *processes* processes, each asking again when answered; the first answer
    of each is warm-up."""
    asks = asks_per_client(c, requests)
    groups = [Group(kind, n, tokens, server.ws, server.http, asks=asks) for n in split(c, processes)]
    before = server_ttft(server)
    busy = GpuBusy()
    with contextlib.ExitStack() as sampling:  # from the start on: not while workers get ready
        _, answered = await run_clients(
            groups, pictures, spawn=processes > 1, started=lambda: sampling.enter_context(busy)
        )
    everything = [a for group in answered for a in group]  # the server's TTFT figures count the first wave
    answers = [a for a in everything if not a.warmup]
    # Steady state: from the median completion of the first wave (it arrives all at once); stamps
    # from every process compare (time.monotonic: CLOCK_MONOTONIC is system-wide on Linux).
    first_wave = [a.done for a in everything if a.warmup and a.done is not None]
    result = summarize(answers, statistics.median(first_wave) if first_wave else None)
    result["gpu_busy"] = busy.fraction
    result["client_processes"] = processes
    split_ttft(result, before, server_ttft(server), everything)
    return result


async def followup(server: Server, pictures: Pictures, c: int, rounds: int, tokens: int) -> dict[str, Any]:
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
    server: Server,
    pictures: Pictures,
    streamers: int,
    burst: int,
    every: float,
    seconds: float,
    tokens: int,
    processes: int,
) -> dict[str, Any]:
    """*streamers* clients stream text answers (follow-ups about a picture); after a quiet phase
    of *seconds*, a burst of *burst* new-picture asks arrives every *every* seconds for as long.
    A gap between two deltas of a streamer belongs to the phase in which it ended. Over more than
    one process, the streamers and the arrivals never share one (an arrival's upload would delay
    a streamer's reads)."""
    spread, rest = 1, 1  # processes for the streamers and for the arrivals (or both in this one)
    if processes > 1:
        spread = max(1, min(processes - 1, round(processes * streamers / (streamers + burst))))
        rest = processes - spread
    shares = split(streamers, spread), split(burst, rest)
    groups = [Group(Role.STREAMER, n, tokens, server.ws, server.http) for n in shares[0]]
    groups += [
        Group(Role.ARRIVAL, n, ARRIVAL_TOKENS, server.ws, server.http, every=every, seconds=seconds)
        for n in shares[1]
    ]
    # The phases: from the one start the parent stamps; the streamers stop at the end.
    quiet, answered = await run_clients(groups, pictures, spawn=processes > 1, stop_after=2 * seconds)
    busy, end = quiet + seconds, quiet + 2 * seconds
    answers = [a for group in answered[: len(shares[0])] for a in group]
    arrivals = [a for group in answered[len(shares[0]) :] for a in group]

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
        "client_processes": len(groups) if processes > 1 else 1,
        **({"streamer_processes": len(shares[0])} if processes > 1 else {}),
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


def executor_figures(
    model_dir: str, args: argparse.Namespace, levels: list[int], work: Path
) -> dict[int, Any]:
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
        "--kv-cache-dtype", args.kv_cache_dtype, "--weights-dtype", args.weights_dtype,
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


def arrive(args: argparse.Namespace) -> tuple[int, int, float, float]:
    """--arrive: streamers, burst, every (s), phase (s)."""
    streamers, burst, every, phase_s = args.arrive.split(",")
    return int(streamers), int(burst), float(every), float(phase_s)


def processes_for(args: argparse.Namespace, clients: int) -> int:
    return client_processes(args.client_processes, clients, args.device == "cpu")


def processes_option(value: str) -> str:
    if value != "auto" and not (value.isdigit() and int(value) >= 1):
        raise argparse.ArgumentTypeError(f"expected auto or a number of processes, got {value!r}")
    return value


def planned_pictures(
    args: argparse.Namespace, scenarios: list[str], levels: list[int], openai_levels: list[int],
    follow_levels: list[int],
) -> int:  # fmt: skip
    """The pictures this process hands out: warm-ups, followup, and the scenarios whose clients
    run here (worker processes make their own)."""
    streamers, burst, every, phase_s = arrive(args)
    planned = 0
    for name in {"ws", "ws1", "openai"} & set(scenarios):
        for c in openai_levels if name == "openai" else levels:
            planned += 2 * asks_per_client(2, 2)  # the warm-up, at most 2 clients
            if name == "ws1" or processes_for(args, c) == 1:
                planned += c * asks_per_client(c, requests(c, args.rounds))
    if "followup" in scenarios:
        planned += sum(c * (args.followup_rounds + 1) for c in follow_levels)
    if "arriving" in scenarios and processes_for(args, streamers + burst) == 1:
        planned += streamers + burst * len(burst_offsets(every, phase_s))
    return planned


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
    parser.add_argument(
        "--scenarios", default="executor,ws,openai,followup,arriving", help=f"of {','.join(SCENARIOS)}"
    )
    parser.add_argument(
        "--client-processes",
        type=processes_option,
        default="auto",
        help="worker processes for the clients of ws, openai and arriving (1: all in this one); "
        "auto: 8 clients a process, at most cpu_count - 2 (cpu device: 1)",
    )
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
    parser.add_argument(
        "--kv-cache-dtype", default="auto", choices=["auto", "fp8"], help="model.kv_cache_dtype, both sides"
    )
    parser.add_argument(
        "--weights-dtype", default="auto", choices=["auto", "fp8"], help="model.weights_dtype, both sides"
    )
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
    if args.kv_cache_dtype != "auto":
        args.server_env.append(f"MODEL_KV_CACHE_DTYPE={args.kv_cache_dtype}")
    if args.weights_dtype != "auto":
        args.server_env.append(f"MODEL_WEIGHTS_DTYPE={args.weights_dtype}")
    streamers, burst, _, _ = arrive(args)
    scenarios = args.scenarios.split(",")
    if unknown := set(scenarios) - set(SCENARIOS):
        parser.error(f"unknown scenarios {sorted(unknown)}: expected some of {','.join(SCENARIOS)}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vlbridge-serve-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    planned = planned_pictures(args, scenarios, levels, openai_levels, follow_levels)
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
    results: dict[str, Any] = {
        "info": info,
        "executor": {},
        "ws": {},
        "ws1": {},
        "openai": {},
        "followup": {},
    }

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
        model_dir, args, max(levels + openai_levels + [streamers + burst * 4]), work / "serve.log"
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
    """Each scenario in the order given; one that fails is recorded and the next one still runs."""
    streamers, burst, every, phase_s = arrive(args)
    tokens = args.new_tokens

    def attempt(name: str, run: Any) -> Any:
        print(f"--- {name} starts at {time.strftime('%H:%M:%S')}", flush=True)
        try:
            return run()
        except Exception as exc:
            print(f"{name} failed: {exc!r}", flush=True)
            return {"error": repr(exc)}

    def closed(name: str) -> None:
        kind = Role.OPENAI if name == "openai" else Role.WS
        for c in openai_levels if name == "openai" else levels:
            processes = 1 if name == "ws1" else processes_for(args, c)
            # The warm-up warms the server (its figures are dropped): in this process, no spawn.
            attempt(
                "warm-up", lambda: asyncio.run(closed_loop(kind, server, pictures, min(c, 2), 2, tokens, 1))
            )
            results[name][c] = attempt(
                name,
                lambda: asyncio.run(
                    closed_loop(kind, server, pictures, c, requests(c, args.rounds), tokens, processes)
                ),
            )
            print(name, c, json.dumps(results[name][c]), flush=True)
            save()

    for name in scenarios:
        if name in ("ws", "ws1", "openai"):
            closed(name)
        elif name == "followup":
            for c in follow_levels:
                results["followup"][c] = attempt(
                    "followup",
                    lambda: asyncio.run(followup(server, pictures, c, args.followup_rounds, tokens)),
                )
                print("followup", c, json.dumps(results["followup"][c]), flush=True)
                save()
        elif name == "arriving":
            processes = processes_for(args, streamers + burst)
            results["arriving"] = attempt(
                "arriving",
                lambda: asyncio.run(
                    arriving(server, pictures, streamers, burst, every, phase_s, tokens, processes)
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
    header = ("system", "conc", "client procs", "req/s", "tok/s", "tokens", "TTFT p50/p95 ms",
              "gap p50/p99 ms", "lat p50/p95 ms", "GPU busy", "x executor")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    executor = {int(k): v for k, v in results["executor"].items()}
    for c in sorted({*levels, *map(int, results["openai"])}):
        base = executor.get(c)
        if base and base.get("rps"):
            print(
                f"| executor | {c} | - | {base['rps']:.2f} | {base['tok_s']:.0f} | {info['new_tokens']} | "
                f"{_ms(base['ttft_p50'])}/{_ms(base['ttft_p95'])} | - | "
                f"{_ms(base['lat_p50'])}/{_ms(base['lat_p95'])} | {base.get('gpu_busy') or '-'} | 1 |"
            )
        for kind in ("ws", "ws1", "openai"):  # ws1: ws with its clients in one process
            r = results[kind].get(c)
            if not r or "rps" not in r:
                continue
            ratio = f"{r['rps'] / base['rps']:.2f}" if base and base.get("rps") else "-"
            busy = f"{r['gpu_busy']:.0%}" if r.get("gpu_busy") is not None else "-"
            print(
                f"| {kind} | {c} | {r['client_processes']} | {r['rps']:.2f} | {r['tok_s']:.0f} | "
                f"{r['tokens_mean']:.0f} | "
                f"{_ms(r['ttft_p50'])}/{_ms(r['ttft_p95'])} | {_ms(r['gap_p50'])}/{_ms(r['gap_p99'])} | "
                f"{_ms(r['lat_p50'])}/{_ms(r['lat_p95'])} | {busy} | {ratio} |"
            )
    for kind in ("ws", "openai"):
        for c, r in results[kind].items():
            if r.get("server_ttft_mean") is not None:
                print(
                    f"{kind} c={c}: TTFT mean at the client {_ms(r['ttft_mean'])} ms, inside the server "
                    f"(submission to first token) {_ms(r['server_ttft_mean'])} ms; accepted (the "
                    f"server's first frame) p50/p95 {_ms(r.get('accept_p50'))}/{_ms(r.get('accept_p95'))} "
                    f"ms, of which sent (the client's send returned) {_ms(r.get('upload_p50'))}/"
                    f"{_ms(r.get('upload_p95'))} ms"
                )
            if r.get("outside_first_p50") is not None:
                print(
                    f"{kind} c={c}: beyond the server's own times (before submission + relay back), p50: "
                    f"first text {_ms(r['outside_first_p50'])} ms, end {_ms(r['outside_done_p50'])} ms; "
                    f"`started` to the first text {_ms(r['started_first_p50'])} ms"
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
        if "server_queued_p50" in r["followup"]:
            print(
                f"follow-up c={c}: inside the server, p50: prepared and queued "
                f"{_ms(r['first']['server_queued_p50'])} / {_ms(r['followup']['server_queued_p50'])} ms, "
                f"prefill to the first token {_ms(r['first']['server_prefill_p50'])} / "
                f"{_ms(r['followup']['server_prefill_p50'])} ms (first question / follow-up)"
            )
    if "quiet" in results.get("arriving", {}):
        r = results["arriving"]
        print(
            f"arriving: {r['streamers']} streaming clients ({r['client_processes']} client processes); "
            f"gap p50/p99/max quiet "
            f"{_ms(r['quiet']['gap_p50'])}/{_ms(r['quiet']['gap_p99'])}/{_ms(r['quiet']['gap_max'])} ms, "
            f"with a burst of {r['burst']} new pictures every {r['every_s']} s "
            f"{_ms(r['busy']['gap_p50'])}/{_ms(r['busy']['gap_p99'])}/{_ms(r['busy']['gap_max'])} ms; "
            f"arrivals' TTFT p50 {_ms(r['arrivals']['ttft_p50'])} ms"
        )


if __name__ == "__main__":
    main()
