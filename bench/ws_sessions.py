"""Benchmark: what WebSocket sessions cost the vlbridge server, and how fast it answers.

Runs everything on loopback, bounded in time (two to three minutes). The server under
test is pinned to one CPU; the load comes from worker processes (`--clients`, uvloop when
installed) pinned to the other CPUs, so that it is the server that is measured.

1. Idle sessions: starts `vlbridge serve` (zero-cost backend, pings compressed to 1 s) in
   its own process, opens N sessions (default 10,000) that answer every ping, holds them
   for a while, and reports server RSS per session, the server's CPU while it only pings,
   and sessions wrongly dropped (must be 0).
2. Asks: C sessions (default 32) ask "hi" back to back, each waiting for its answer,
   against vlbridge with the zero-cost backend (`builtin:instant`: the server alone),
   against vlbridge with the real executor over the echo engine (`builtin:echo`), and
   C connections do the same against a bare `websockets` echo server (one message in,
   one out). The three servers start once; rounds alternate the load between them so
   that drift on a shared machine hits them alike (an idle server costs nothing).
   Reports round-trip p50/p99, throughput and server CPU per ask or message.

    python bench/ws_sessions.py [--sessions 10000] [--hold 10] [--concurrency 32]
                                [--clients 4] [--duration 5] [--rounds 3] [--skip-idle]

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

ROOT = Path(__file__).resolve().parent.parent


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env() -> dict[str, str]:
    """This environment, with the project importable (ahead of what PYTHONPATH already holds)."""
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def wait_port(port: int, process: subprocess.Popen[bytes], within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise SystemExit("the server did not start in time")


def start_vlbridge(
    port: int, ping_interval: float, ping_timeout: float, max_sessions: int, model: str = "builtin:instant"
) -> subprocess.Popen[bytes]:
    config = Path(tempfile.mkdtemp()) / "bench.toml"
    config.write_text(
        f"""[server]
host = "127.0.0.1"
port = {port}
ping_interval = {ping_interval}
ping_timeout = {ping_timeout}
max_sessions = {max_sessions}
max_frames_per_second = 100000.0
shutdown_grace = 1.0
[model]
path = "{model}"
max_new_tokens = 64
[executor]
max_batch = 256
queue_size = 4096
"""
    )
    command = [sys.executable, "-c", _SERVE, str(config)]
    return subprocess.Popen(command, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# The server process: raise its descriptor limit, then run the real CLI.
_SERVE = """
import resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
from server.cli import main
sys.exit(main(["--log-level", "warning", "serve", "--config", sys.argv[1]]))
"""

_BARE_ECHO = """
import asyncio, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
from websockets.asyncio.server import serve
try:
    import uvloop
except ImportError:
    uvloop = None

async def echo(ws):
    async for message in ws:
        await ws.send(message)

async def main(port):
    async with serve(echo, "127.0.0.1", port, ping_interval=None, compression=None, max_size=None):
        await asyncio.Future()

(uvloop.run if uvloop else asyncio.run)(main(int(sys.argv[1])))
"""


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ---- phase 1: idle sessions ------------------------------------------------------------------------


@dataclass
class IdleStats:
    opened: int = 0
    failed: int = 0
    pings: int = 0
    closed: dict[int, int] = field(default_factory=dict)


async def idle_session(url: str, stats: IdleStats, hold: asyncio.Event, ready: asyncio.Semaphore) -> None:
    try:
        ws = await connect(url, ping_interval=None, compression=None, open_timeout=60, close_timeout=2)
    except Exception:
        stats.failed += 1
        ready.release()
        return
    try:
        await ws.recv()  # hello
        stats.opened += 1
        ready.release()
        while not hold.is_set():
            frame = orjson.loads(await ws.recv())
            if frame["type"] == "ping":
                stats.pings += 1
                await ws.send(orjson.dumps({"type": "pong", "ts": frame["ts"]}).decode())
    except ConnectionClosed as exc:
        if not hold.is_set():
            code = exc.rcvd.code if exc.rcvd else 1006
            stats.closed[code] = stats.closed.get(code, 0) + 1
    finally:
        await ws.close()


async def idle_worker(url: str, connections: int) -> None:
    """Hold *connections* idle sessions that answer every ping. Prints one JSON line when
    they are open, then its counts for each "mark" read on stdin and once more at the end
    (anything else, or the end of stdin, ends it)."""
    stats, hold, ready = IdleStats(), asyncio.Event(), asyncio.Semaphore(0)
    tasks: list[asyncio.Task[Any]] = []
    for start in range(0, connections, 250):  # open in waves so the accept backlog keeps up
        wave = min(250, connections - start)
        tasks.extend(asyncio.create_task(idle_session(url, stats, hold, ready)) for _ in range(wave))
        for _ in range(wave):
            await ready.acquire()
    print(orjson.dumps({"opened": stats.opened, "failed": stats.failed}).decode(), flush=True)

    def report() -> None:
        line = orjson.dumps({"pings": stats.pings, "closed": stats.closed}, option=orjson.OPT_NON_STR_KEYS)
        print(line.decode(), flush=True)

    while (await asyncio.to_thread(sys.stdin.readline)).strip() == "mark":
        report()
    report()
    hold.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class Workers:
    """Load-generating processes (`--client-worker`), each pinned to one of the client CPUs."""

    def __init__(self, kind: str, url: str, total: int, count: int, seconds: float, cpus: Cpus) -> None:
        self.procs = []
        for i in range(count):
            share = total // count + (1 if i < total % count else 0)
            command = [sys.executable, __file__, "--client-worker", kind, url, str(share), str(seconds)]
            proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            psutil.Process(proc.pid).cpu_affinity([cpus.clients[i % len(cpus.clients)]])
            self.procs.append(proc)

    def tell(self, line: str) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(line + "\n")
            proc.stdin.flush()

    def lines(self) -> list[str]:
        """The next line of each worker."""
        out = []
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise SystemExit("a client worker failed")
            out.append(line.strip())
        return out

    def finish(self, timeout: float) -> list[dict[str, Any]]:
        """Close stdin; the last JSON line of each worker."""
        results = []
        for proc in self.procs:
            out, _ = proc.communicate(timeout=timeout)
            results.append(orjson.loads(out.strip().splitlines()[-1]))
        return results


def measure_idle(args: argparse.Namespace) -> dict[str, Any]:
    cpus = Cpus.plan()
    port = free_port()
    server = start_vlbridge(port, args.interval, args.timeout, args.sessions + 100)
    try:
        wait_port(port, server)
        proc = psutil.Process(server.pid)
        proc.cpu_affinity([cpus.server])
        url = f"ws://127.0.0.1:{port}/ws"
        warm = Workers("idle", url, 50, 1, 0, cpus)  # imports, first allocations, a few ping rounds
        warm.lines()
        time.sleep(1.5)
        warm.finish(30)
        time.sleep(1.0)
        rss_before = proc.memory_info().rss

        started = time.monotonic()
        workers = Workers("idle", url, args.sessions, args.clients, 0, cpus)
        opened = [orjson.loads(line) for line in workers.lines()]
        open_seconds = time.monotonic() - started
        time.sleep(min(2 * args.interval, 5.0))  # settle: every session pinged at least once (1 s pings)

        def mark() -> tuple[float, int, dict[int, int]]:
            cpu = sum(proc.cpu_times()[:2])
            workers.tell("mark")
            marks = [orjson.loads(line) for line in workers.lines()]
            closed: dict[int, int] = {}
            for m in marks:
                for code, n in m["closed"].items():
                    closed[int(code)] = closed.get(int(code), 0) + n
            return cpu, sum(m["pings"] for m in marks), closed

        rss_open = proc.memory_info().rss
        cpu0, pings0, _ = mark()
        t0 = time.monotonic()
        time.sleep(args.hold)
        cpu1, pings1, closed = mark()
        t1 = time.monotonic()
        rss_after = proc.memory_info().rss
        workers.finish(60)
        sessions = sum(o["opened"] for o in opened)
        return {
            "sessions": sessions,
            "failed": sum(o["failed"] for o in opened),
            "open_seconds": open_seconds,
            "rss_before": rss_before,
            "rss_open": rss_open,
            "rss_after": rss_after,
            "per_session": (max(rss_open, rss_after) - rss_before) / max(1, sessions),
            "cpu_fraction": (cpu1 - cpu0) / (t1 - t0),
            "pings_per_second": (pings1 - pings0) / (t1 - t0),
            "wrong_drops": sum(closed.values()),
            "closes": closed,
        }
    finally:
        stop(server)


# ---- phase 2: asks vs bare echo ----------------------------------------------------------------------


async def ask_loop(ws: ClientConnection, until: float, rtts: list[float], tag: str) -> int:
    """Ask "hi" back to back until *until*; return the frames received."""
    n = frames = 0
    while time.monotonic() < until:
        n += 1
        ask_id = f"{tag}-{n}"
        sent = time.perf_counter()
        await ws.send(orjson.dumps({"type": "ask", "id": ask_id, "text": "hi"}).decode())
        while True:
            frame = orjson.loads(await ws.recv())
            if frame["type"] == "ping":  # as every client must: the pong lets the server drop frames
                await ws.send(orjson.dumps({"type": "pong", "ts": frame["ts"]}).decode())
                continue
            frames += 1
            if frame.get("id") == ask_id and frame["type"] in ("done", "error"):
                if frame["type"] == "error":
                    raise RuntimeError(f"ask failed: {frame}")
                break
        rtts.append(time.perf_counter() - sent)
    return frames


async def echo_loop(ws: ClientConnection, until: float, rtts: list[float], tag: str) -> int:
    payload = orjson.dumps({"type": "ask", "id": tag, "text": "hi"}).decode()
    n = 0
    while time.monotonic() < until:
        sent = time.perf_counter()
        await ws.send(payload)
        await ws.recv()
        n += 1
        rtts.append(time.perf_counter() - sent)
    return n


async def client_worker(kind: str, url: str, connections: int, duration: float) -> None:
    """One load-generating process: connect, warm up, say "ready", wait for "go" on stdin,
    run for *duration*, print one JSON line of results."""
    loop_fn = ask_loop if kind == "ask" else echo_loop
    conns = [
        await connect(url, ping_interval=None, compression=None, max_size=None) for _ in range(connections)
    ]
    if kind == "ask":
        for ws in conns:
            await ws.recv()  # hello
    warm_until = time.monotonic() + 1.0
    await asyncio.gather(*(loop_fn(ws, warm_until, [], f"w{i}") for i, ws in enumerate(conns)))
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    rtts: list[float] = []
    cpu0, started = sum(psutil.Process().cpu_times()[:2]), time.monotonic()
    counts = await asyncio.gather(
        *(loop_fn(ws, started + duration, rtts, f"c{i}") for i, ws in enumerate(conns))
    )
    elapsed = time.monotonic() - started
    cpu = sum(psutil.Process().cpu_times()[:2]) - cpu0
    for ws in conns:
        await ws.close()
    result = {
        "rtts_us": [round(1e6 * r) for r in rtts],
        "frames": sum(counts),
        "elapsed": elapsed,
        "cpu": cpu,
    }
    print(orjson.dumps(result).decode(), flush=True)


@dataclass
class Cpus:
    """Where things run: the server alone on one CPU, the load generators on the others."""

    server: int
    clients: list[int]

    @classmethod
    def plan(cls) -> Cpus:
        """The last CPU for the server (CPU 0 tends to get the machine's interrupts and
        housekeeping), the others for load, except the server CPU's hyperthread twins:
        load there would slow the server down (when CPUs are left)."""
        cpus = sorted(os.sched_getaffinity(0))
        server, others = cpus[-1], cpus[:-1]
        twins = siblings(server)
        return cls(server, [cpu for cpu in others if cpu not in twins] or others or cpus)


def twins(cpu: int) -> str:
    others = ",".join(map(str, sorted(siblings(cpu))))
    return f" (its hyperthread twin {others} left idle)" if others else ""


def siblings(cpu: int) -> set[int]:
    """The CPUs sharing *cpu*'s core (Linux sysfs, e.g. "0,8" or "0-1"); empty if unknown."""
    path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
    try:
        text = path.read_text().strip()
    except OSError:
        return set()
    found: set[int] = set()
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        found.update(range(int(first), int(last or first) + 1))
    return found - {cpu}


def round_trips(
    url: str, kind: str, args: argparse.Namespace, server: psutil.Process, cpus: Cpus
) -> dict[str, float]:
    """Drive *url* with `args.clients` worker processes holding `args.concurrency` connections."""
    server.cpu_affinity([cpus.server])
    workers = Workers(kind, url, args.concurrency, args.clients, args.duration, cpus)
    if any(line != "ready" for line in workers.lines()):
        raise SystemExit("a client worker failed to start")
    cpu0, started = sum(server.cpu_times()[:2]), time.monotonic()
    workers.tell("go")
    results = workers.finish(args.duration + 60)
    elapsed = time.monotonic() - started
    server_cpu = (sum(server.cpu_times()[:2]) - cpu0) / elapsed
    rtts = sorted(r for result in results for r in result["rtts_us"])
    count = len(rtts)
    per_second = sum(len(result["rtts_us"]) / result["elapsed"] for result in results)
    return {
        "count": count,
        "per_second": per_second,
        "p50_ms": statistics.median(rtts) / 1000,
        "p99_ms": rtts[int(0.99 * (count - 1))] / 1000,
        "server_cpu": server_cpu,
        "server_us": 1e6 * server_cpu / per_second,
        "client_cpu": sum(result["cpu"] / result["elapsed"] for result in results),
        "frames_per": sum(result["frames"] for result in results) / max(1, count),
    }


def start_bare_echo(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _BARE_ECHO, str(port)],
        env=child_env(),
        stderr=subprocess.DEVNULL,  # the port probe
    )


@contextlib.contextmanager
def running(process: subprocess.Popen[bytes], port: int) -> Iterator[psutil.Process]:
    """*process* once it listens on *port*; stopped on the way out."""
    try:
        wait_port(port, process)
        yield psutil.Process(process.pid)
    finally:
        stop(process)


def measure_asks(args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    """Start the three servers, then alternate the load between them for `args.rounds`
    rounds, the zero-cost vlbridge next to the echo server it is compared with."""
    cpus = Cpus.plan()
    servers: dict[str, Callable[[int], subprocess.Popen[bytes]]] = {
        "instant": lambda port: start_vlbridge(port, 45.0, 10.0, 1000, "builtin:instant"),
        "bare": start_bare_echo,
        "echo-engine": lambda port: start_vlbridge(port, 45.0, 10.0, 1000, "builtin:echo"),
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
    with contextlib.ExitStack() as stack:
        targets = []
        for name, start in servers.items():
            port = free_port()
            process = stack.enter_context(running(start(port), port))
            url, kind = (
                (f"ws://127.0.0.1:{port}/", "echo")
                if name == "bare"
                else (f"ws://127.0.0.1:{port}/ws", "ask")
            )
            targets.append((name, url, kind, process))
        for _ in range(args.rounds):
            for name, url, kind, process in targets:
                runs[name].append(round_trips(url, kind, args, process, cpus))
    return runs


async def executor_only(concurrency: int, duration: float) -> float:
    """Asks/s of the executor with the echo engine in this process: no transport at all."""
    sys.path.insert(0, str(ROOT))
    from server.backend import build_executor
    from server.config import Config, ExecutorConfig, ModelConfig
    from server.inference.api import InferenceRequest, Turn

    config = Config(
        model=ModelConfig(path="builtin:echo"), executor=ExecutorConfig(max_batch=256, queue_size=4096)
    )
    from server.inference.executor import InferenceExecutor

    executor = build_executor(config)
    assert isinstance(executor, InferenceExecutor)  # the echo engine runs in the real executor
    await executor.start()
    await executor.wait_ready(30)
    count = 0

    async def loop(tag: int, until: float) -> None:
        nonlocal count
        n = 0
        while time.monotonic() < until:
            n += 1
            async for _ in executor.submit(InferenceRequest(f"{tag}-{n}", [Turn.user("hi")])):
                pass
            count += 1

    started = time.monotonic()
    await asyncio.gather(*(loop(i, started + duration) for i in range(concurrency)))
    rate = count / (time.monotonic() - started)
    await executor.stop()
    return rate


# ---- report --------------------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = psutil.virtual_memory().total / 2**30
    return (
        f"{os.cpu_count()} x {cpu}, {memory:.0f} GiB RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    return sorted(runs, key=lambda run: run["per_second"])[len(runs) // 2]


def idle_rows(idle: dict[str, float], args: argparse.Namespace) -> list[str]:
    kib = idle["per_session"] / 1024
    return [
        f"| idle phase | {int(idle['sessions'])} sessions opened in {idle['open_seconds']:.1f} s "
        f"({int(idle['failed'])} failed), pings every {args.interval:g} s (timeout {args.timeout:g} s), "
        f"held {args.hold:g} s | | |",
        f"| server RSS per idle session | {kib:.1f} KiB | <= 30 KiB | {'ok' if kib <= 30 else 'MISSED'} |",
        f"| server RSS: before / {int(idle['sessions'])} open / after hold | "
        f"{idle['rss_before'] / 2**20:.0f} / "
        f"{idle['rss_open'] / 2**20:.0f} / {idle['rss_after'] / 2**20:.0f} MiB | | |",
        f"| server CPU while only pinging | {100 * idle['cpu_fraction']:.1f}% of a core "
        f"({idle['pings_per_second']:.0f} pings/s answered) | | |",
        f"| CPU per ping (send + pong handling) | "
        f"{1e6 * idle['cpu_fraction'] / max(1.0, idle['pings_per_second']):.0f} us | | |",
        f"| sessions wrongly dropped | {int(idle['wrong_drops'])} {idle['closes'] or ''} | 0 | "
        f"{'ok' if idle['wrong_drops'] == 0 and idle['failed'] == 0 else 'MISSED'} |",
    ]


def report(
    idle: dict[str, float] | None,
    runs: dict[str, list[dict[str, float]]],
    alone: float,
    args: argparse.Namespace,
) -> str:
    instant, engine, bare = (median_run(runs[k]) for k in ("instant", "echo-engine", "bare"))
    ratios = [a["per_second"] / b["per_second"] for a, b in zip(runs["instant"], runs["bare"], strict=True)]
    ratio = statistics.median(ratios)
    cpus = Cpus.plan()

    def asks_row(label: str, run: dict[str, float], unit: str) -> str:
        return (
            f"| {label} | {run['per_second']:.0f} {unit}/s, "
            f"p50 {run['p50_ms']:.2f} / p99 {run['p99_ms']:.2f} ms; "
            f"server {run['server_us']:.1f} us CPU per {unit[:-1] if unit.endswith('s') else unit} "
            f"({100 * run['server_cpu']:.0f}% of its core), clients {100 * run['client_cpu']:.0f}% | | |"
        )

    lines = [
        f"Machine: {machine()}; loopback. Server pinned to CPU {cpus.server}"
        f"{twins(cpus.server)}, load generators on CPUs {','.join(map(str, cpus.clients[: args.clients]))}.",
        f"Asks: {args.concurrency} sessions over {args.clients} client processes, "
        f"each asking back to back for {args.duration:g} s, {args.rounds} rounds alternating the servers "
        '(medians shown); question "hi", answer "echo: hi".',
        "",
        "| measure | value | target | |",
        "|---|---|---|---|",
        *(idle_rows(idle, args) if idle else []),
        asks_row("vlbridge, zero-cost backend (`builtin:instant`)", instant, "asks"),
        asks_row("vlbridge through the real executor (`builtin:echo`)", engine, "asks"),
        asks_row("bare `websockets` echo server", bare, "messages"),
        f"| frames per ask (queued, started, delta, done) | {instant['frames_per']:.1f} | | |",
        f"| asks/s of the executor alone (no transport, same process) | {alone:.0f} | | |",
        f"| zero-cost asks/s ÷ echo messages/s | {100 * ratio:.0f}% "
        f"(rounds: {', '.join(f'{100 * r:.0f}%' for r in ratios)}) | >= 50% | "
        f"{'ok' if ratio >= 0.5 else 'MISSED'} |",
        f"| real-executor asks/s ÷ echo messages/s | "
        f"{100 * engine['per_second'] / bare['per_second']:.0f}% | | |",
    ]
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    limit = raise_fd_limit()
    if limit < args.sessions + 200:
        print(f"note: only {limit} file descriptors; sessions lowered", file=sys.stderr)
        args.sessions = max(100, limit - 500)
    idle = None
    if not args.skip_idle:
        print(f"idle phase: {args.sessions} sessions ...", file=sys.stderr)
        idle = await asyncio.to_thread(measure_idle, args)
    print("ask phase ...", file=sys.stderr)
    runs = await asyncio.to_thread(measure_asks, args)
    alone = await executor_only(args.concurrency, args.duration)
    print(report(idle, runs, alone, args))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--hold", type=float, default=10.0, help="seconds the idle sessions are held")
    parser.add_argument(
        "--interval", type=float, default=1.0, help="server ping interval (compressed from 45 s)"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="server ping timeout (the default one)")
    parser.add_argument("--concurrency", type=int, default=32, help="asking sessions (connections)")
    parser.add_argument(
        "--clients", type=int, default=max(1, min(4, len(os.sched_getaffinity(0)) - 1)),
        help="load-generating processes (default: one per spare CPU, at most 4)",
    )  # fmt: skip
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-idle", action="store_true", help="only the ask phase")
    parser.add_argument("--client-worker", nargs=4, metavar=("KIND", "URL", "CONNECTIONS", "SECONDS"),
                        help=argparse.SUPPRESS)  # fmt: skip
    return parser.parse_args(argv)


def run(coroutine: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coroutine)
    else:
        uvloop.run(coroutine)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.client_worker:
        kind, url, connections, seconds = arguments.client_worker
        raise_fd_limit()
        if kind == "idle":
            run(idle_worker(url, int(connections)))
        else:
            run(client_worker(kind, url, int(connections), float(seconds)))
    else:
        run(main(arguments))
