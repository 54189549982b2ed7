"""Picture preparation throughput: what the preparation threads do per picture, and the device's share.

    python bench/prepare.py [--device cuda] [--threads 8] [--processes 0] [--pictures 48] [--busy]
                            [--out prepare.json]

`ModelEngine.prepare` (decode, patch grid, tokens, M-RoPE positions, hashes) of distinct
1024x1024 noise JPEGs on the demo model (its image processor has Qwen3-VL's patch, merge and
normalization, so the CPU work is the real one): one picture alone, then `--threads` threads
at once (the server's picture pool) as pictures/s, and the CPU time each picture costs its
preparation thread. `--busy` keeps one more thread spinning in
Python meanwhile (a stand-in for the executor's worker and the event loop, which want the
GIL too). `--processes N` decodes the pictures in N worker processes
(`executor.prepare_processes`, server/inference/picture_processes.py) instead of on the threads;
the threads then do the rest (tokens, positions) and wait for them. Then, when the engine
makes patches on the device (`pixels.patches`), their cost
for a prefill slice of 3 and of 8 pictures, timed with the device synchronized.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.executor import distinct_jpegs
from protocol.pictures import ImageLimits
from server.inference.api import Turn
from server.inference.model.demo import build_demo_model
from server.inference.model.loader import load_model
from server.inference.model.model_engine import EngineOptions, ModelEngine
from server.inference.model.runner import ModelRunner


def _spin(stop: threading.Event) -> None:
    count = 0
    while not stop.is_set():
        count += 1


def measure(engine: ModelEngine, pictures: list[bytes], threads: int, busy: bool) -> dict[str, Any]:
    report: dict[str, Any] = {}
    alone = []
    pictures, solo = pictures[:-6], pictures[-6:]  # never the same: decoded pictures are cached
    for data in solo:
        started = time.perf_counter()
        engine.prepare([Turn.user("Describe.", [data])])
        alone.append((time.perf_counter() - started) * 1000)
    report["alone_ms"] = round(statistics.median(alone), 1)
    stop = threading.Event()
    spinner = threading.Thread(target=_spin, args=(stop,), daemon=True)
    if busy:
        spinner.start()

    cpu: list[float] = []

    def one(data: bytes) -> float:
        started, on_cpu = time.perf_counter(), time.thread_time()
        engine.prepare([Turn.user("Describe.", [data])])
        cpu.append((time.thread_time() - on_cpu) * 1000)  # list.append: atomic under the GIL
        return (time.perf_counter() - started) * 1000

    try:
        with ThreadPoolExecutor(threads) as pool:
            started = time.perf_counter()
            times = list(pool.map(one, pictures))
            wall = time.perf_counter() - started
    finally:
        stop.set()
    report["threads"] = threads
    report["busy_python_thread"] = busy
    report["p50_ms"] = round(statistics.median(times), 1)
    report["max_ms"] = round(max(times), 1)
    report["pictures_per_s"] = round(len(pictures) / wall, 1)
    # CPU time of the preparation thread per picture: the most of it that can hold this
    # process's GIL (decoding in worker processes takes the decoding out of it); unlike
    # pictures/s it hardly depends on what else the machine runs.
    report["thread_cpu_ms_p50"] = round(statistics.median(cpu), 1)
    from server.inference.model.vision import Picture

    if "decoded" not in Picture.__dataclass_fields__:  # an engine whose threads make the patches
        return report
    from server.inference.model.pixels import patches

    device, dtype = engine.runner.device, engine.runner.dtype
    decoded = [
        engine.prepare([Turn.user("?", [data])]).data.pictures[0].picture.decoded for data in pictures[:8]
    ]
    for count in (3, 8):
        runs = []
        for _ in range(5):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            patches(decoded[:count], device, dtype)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            runs.append((time.perf_counter() - started) * 1000)
        report[f"device_patches_{count}_ms"] = round(statistics.median(runs[1:]), 2)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--pictures", type=int, default=48)
    parser.add_argument("--processes", type=int, default=0, help="decode in this many processes; 0: threads")
    parser.add_argument("--busy", action="store_true", help="one more thread spinning in Python meanwhile")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    pictures = distinct_jpegs(1024, args.pictures + 6, first_seed=7000)  # forks: before CUDA starts
    demo = build_demo_model(Path(tempfile.mkdtemp()) / "demo")
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    runner = ModelRunner(load_model(str(demo), args.device, dtype), ImageLimits(max_pixels=1024 * 1024), 4096)
    options = EngineOptions(
        max_batch=8, max_context_tokens=4096, memory_fraction=0.1, prepare_processes=args.processes
    )
    engine = ModelEngine(runner, options)
    if engine.picture_processes is not None:
        engine.picture_processes.start()
    try:
        report = {
            "device": args.device,
            "torch_threads": torch.get_num_threads(),
            "processes": args.processes,
        } | measure(engine, pictures, args.threads, args.busy)
    finally:
        engine.close()
    print("prepare:", json.dumps(report), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
