"""Benchmark: one vs two `vlbridge serve` instances on one Redis inbox and one Feishu app.

Real processes on this machine: a redis-server (unix socket), the fake Feishu platform of the
tests (in this process, cluster mode: each delivery goes to one open long connection at
random) and one or two services with the echo engine (``builtin:echo``: the model costs
nothing, so what is measured is the bridge: inbox, dispatch, Feishu calls, card streaming).
After a warm-up, N pictures from C chats are pushed as fast as the fake takes them, each
delivered twice (``--copies``: redeliveries the inbox must recognise). Reported per setup:
answered messages/s (from the first push to the last card closed), p50/p95 time from a
message's push to its finished card, and duplicate answers (a second reply: must be 0).

    python bench/two_instances.py [--messages 200] [--chats 20] [--copies 2] [--out DIR]

Prints a Markdown table; with ``--out`` also writes ``two_instances.md`` and ``.json`` there.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.inference.echo import ECHO_PATH  # noqa: E402
from tests.conftest import make_png  # noqa: E402
from tests.fakefeishu import FakeFeishu, User  # noqa: E402
from tests.fakefeishu.fixtures import FAST  # noqa: E402
from tests.feishu_service import serving_together, write_config  # noqa: E402
from tests.redisserver import RedisServer  # noqa: E402


@dataclass
class Result:
    instances: int
    messages: int
    seconds: float
    per_second: float
    p50_ms: float
    p95_ms: float
    duplicates: int
    answered_by: list[int]


def answers(fake: FakeFeishu, pushed: dict[str, float]) -> tuple[dict[str, float], int]:
    """Finished answers (message -> when its card closed) and duplicate replies so far."""
    replies: dict[str, list[str | None]] = defaultdict(list)
    for reply in fake.records.replies():
        if reply.parent_id in pushed:
            replies[reply.parent_id].append(reply.card_id)
    cards = {card.card_id: card for card in fake.records.cards()}
    done = {}
    for mid, card_ids in replies.items():
        card = cards.get(card_ids[0] or "")
        if card is not None and card.closed:
            done[mid] = card.history[-1].at
    return done, sum(len(ids) - 1 for ids in replies.values())


def push_pictures(fake: FakeFeishu, count: int, chats: int, copies: int, tag: str) -> dict[str, float]:
    """*count* pictures over *chats* chats, as fast as the fake takes them; message -> push time."""
    users = [User(name=f"user {c}") for c in range(chats)]
    png = make_png(64, 48)
    pushed = {}
    for i in range(count):
        event = fake.events.image(f"img_{tag}_{i}", chat_id=f"oc_{tag}_{i % chats}", sender=users[i % chats])
        mid = str(event["event"]["message"]["message_id"])
        pushed[mid] = time.monotonic()
        fake.push_event(event, resources={f"img_{tag}_{i}": png}, copies=copies)
    return pushed


def handled(lines: list[str], pushed: dict[str, float]) -> int:
    """How many of the pushed messages a service began to answer (it logs each one it takes)."""
    text = "".join(lines)
    return sum(f"message {mid} in " in text for mid in pushed)


def wait_answered(fake: FakeFeishu, pushed: dict[str, float], within: float) -> tuple[dict[str, float], int]:
    deadline = time.monotonic() + within
    while True:
        done, duplicates = answers(fake, pushed)
        if len(done) == len(pushed):
            return done, duplicates
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(done)} of {len(pushed)} answered within {within} s")
        time.sleep(0.05)


def measure(instances: int, redis_url: str, folder: Path, args: argparse.Namespace) -> Result:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    with FakeFeishu(client_config=FAST) as fake:
        configs = [
            write_config(
                folder / f"{instances}-{n}.toml",
                fake,
                folder,
                folder / f"data-{instances}-{n}",
                max_new_tokens=64,
                model=ECHO_PATH,
                feishu="user_rate_per_minute = 100000",
                redis_url=redis_url,
                redis_prefix=prefix,
                executor="max_batch = 64\nqueue_size = 256",
            )
            for n in range(instances)
        ]
        with serving_together(fake, configs) as services:
            warm = push_pictures(fake, 20, args.chats, 1, "warm")
            wait_answered(fake, warm, 300)
            pushed = push_pictures(fake, args.messages, args.chats, args.copies, "run")
            done, duplicates = wait_answered(fake, pushed, 600)
            # The last copies may still be on their way: let every delivery be acknowledged.
            deadline = time.monotonic() + 60
            while len(fake.records.acks()) < len(fake.records.deliveries()) and time.monotonic() < deadline:
                time.sleep(0.05)
            _, duplicates = answers(fake, pushed)
            by = [
                sum(any(f"message {mid} in " in line for line in list(s.lines)) for mid in pushed)
                for s in services
            ]
    seconds = max(done.values()) - min(pushed.values())
    latencies = sorted((done[mid] - pushed[mid]) * 1000 for mid in pushed)
    return Result(
        instances=instances,
        messages=len(pushed),
        seconds=round(seconds, 3),
        per_second=round(len(pushed) / seconds, 1),
        p50_ms=round(statistics.median(latencies), 1),
        p95_ms=round(latencies[int(len(latencies) * 0.95) - 1], 1),
        duplicates=duplicates,
        answered_by=by,
    )


def report(results: list[Result], args: argparse.Namespace) -> str:
    one, two = results
    rows = [
        ("answered messages/s", one.per_second, two.per_second, two.per_second / one.per_second),
        ("push to finished card p50, ms", one.p50_ms, two.p50_ms, two.p50_ms / one.p50_ms),
        ("push to finished card p95, ms", one.p95_ms, two.p95_ms, two.p95_ms / one.p95_ms),
    ]
    lines = [
        f"# two_instances: {args.messages} pictures from {args.chats} chats, each delivered "
        f"{args.copies} times ({platform.node()}, {os.cpu_count()} CPUs, load average "
        f"{args.load:.1f} at the start, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        "| | one instance | two instances | two / one |",
        "|---|---|---|---|",
        *(f"| {name} | {a:g} | {b:g} | {ratio:.2f} |" for name, a, b, ratio in rows),
        f"| duplicate answers (must be 0) | {one.duplicates} | {two.duplicates} | |",
        f"| answered by each instance | {one.answered_by[0]} | {' / '.join(map(str, two.answered_by))} | |",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--chats", type=int, default=20)
    parser.add_argument("--copies", type=int, default=2, help="deliveries of each event")
    parser.add_argument("--out", type=Path, help="folder for two_instances.md and .json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.load = os.getloadavg()[0]  # a shared machine: what else ran is part of the result
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        redis = RedisServer(folder)
        redis.start()
        try:
            results = []
            for instances in (1, 2):
                print(f"{instances} instance(s) ...", file=sys.stderr)
                run_folder = folder / f"run-{instances}"
                run_folder.mkdir()
                results.append(measure(instances, redis.url, run_folder, args))
        finally:
            with contextlib.suppress(Exception):
                redis.stop()
    table = report(results, args)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "two_instances.md").write_text(table)
        data: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
        data["results"] = [asdict(r) for r in results]
        (args.out / "two_instances.json").write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    return 1 if any(r.duplicates for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
