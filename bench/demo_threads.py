"""Benchmark: the demo model's decode speed on the CPU by torch thread count, idle and busy.

The demo model (tiny, random weights) through the real executor on the CPU: one question with a
picture, the answer forced to ``--tokens`` tokens (min = max), tokens/s from `Started` to `Done`.
Each thread count runs with the machine as it is ("idle") and again while one extra process
spins on a core ("busy": ``python -c 'while 1: pass'``, killed afterwards). torch's default is
one thread per core; OpenMP threads wait for each other at every operation, so one descheduled
thread stalls every step of a model this small.

    python bench/demo_threads.py [--threads 2,1] [--tokens 512] [--repeat 3] [--out DIR]

Prints a Markdown table; with ``--out`` also writes ``demo_threads.md`` and ``.json`` there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from protocol.pictures import ImageLimits  # noqa: E402
from server.inference.api import Done, InferenceRequest, SamplingParams, Started, Turn  # noqa: E402
from server.inference.executor import ExecutorLimits, InferenceExecutor  # noqa: E402
from server.inference.loading import LoadProgress  # noqa: E402
from server.inference.model.demo import build_demo_model  # noqa: E402
from server.inference.model.model_engine import EngineOptions, ModelEngine  # noqa: E402
from tests.conftest import make_png  # noqa: E402


@dataclass
class Run:
    threads: int
    load: str  # "idle" or "busy"
    tokens: int
    seconds: list[float]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / min(self.seconds)  # the best of the repeats: other jobs share the VM


@contextlib.contextmanager
def busy_core(on: bool) -> Iterator[None]:
    if not on:
        yield
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while 1: pass"])
    try:
        time.sleep(0.5)  # let it get going
        yield
    finally:
        spinner.kill()
        spinner.wait()


async def answer_seconds(executor: InferenceExecutor, tokens: int, n: int) -> float:
    params = SamplingParams(max_new_tokens=tokens, min_new_tokens=tokens, seed=n)
    request = InferenceRequest(
        f"bench-{n}", [Turn.user("What is in this picture?", [make_png(256, 192)])], params
    )
    started = 0.0
    async for event in executor.submit(request):
        if isinstance(event, Started):
            started = time.perf_counter()
        elif isinstance(event, Done):
            return time.perf_counter() - started
    raise RuntimeError("the answer did not finish")


def _load(model: Path, options: EngineOptions, progress: LoadProgress) -> ModelEngine:
    return ModelEngine.load(
        str(model), device="cpu", dtype="float32", limits=ImageLimits(), options=options, progress=progress
    )


async def measure(model: Path, threads: list[int], tokens: int, repeat: int) -> list[Run]:
    runs = []
    for count in threads:
        # A fresh executor per count: the engine sets the threads on the worker thread that runs
        # the model (OpenMP settings are per thread: setting them from here would not reach it).
        options = EngineOptions(
            max_batch=1, max_context_tokens=4096, max_new_tokens=tokens, cpu_threads=count
        )
        executor = InferenceExecutor(
            functools.partial(_load, model, options),
            ExecutorLimits(max_batch=1, queue_size=4, request_timeout=900, max_new_tokens=tokens),
            model_name="demo",
        )
        await executor.start()
        await executor.wait_ready(120)
        try:
            for load in ("idle", "busy"):
                with busy_core(load == "busy"):
                    seconds = [await answer_seconds(executor, tokens, n) for n in range(repeat)]
                runs.append(Run(count, load, tokens, seconds))
                print(f"threads {count} {load}: {[round(s, 2) for s in seconds]} s", file=sys.stderr)
        finally:
            await executor.stop()
    return runs


def table(runs: list[Run]) -> str:
    lines = [
        "| torch threads | machine | tokens | best of runs, s | tokens/s |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run.threads} | {run.load} | {run.tokens} | {min(run.seconds):.2f} "
            f"| {run.tokens_per_second:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default=f"{torch.get_num_threads()},1", help="comma-separated counts")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    default = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_demo_model(Path(tmp) / "demo")
        runs = asyncio.run(measure(model, threads, args.tokens, args.repeat))
    head = (
        f"{platform.node()}: {os.cpu_count()} CPUs, torch {torch.__version__} (default {default} "
        f"threads), load average {os.getloadavg()[0]:.1f} at the end"
    )
    text = f"{head}\n\n{table(runs)}\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "demo_threads.md").write_text(text)
        rows = [{**asdict(run), "tokens_per_second": run.tokens_per_second} for run in runs]
        (args.out / "demo_threads.json").write_bytes(orjson.dumps(rows, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
