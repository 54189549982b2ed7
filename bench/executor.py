"""Executor benchmark: vlbridge's continuous-batching executor against stock transformers.

    python bench/executor.py --device cpu                       # demo model, under a minute
    python bench/executor.py --model 2b --out $OUT/2b.json      # on a GPU: real 2B architecture

Systems compared in one run, on the same model, pictures and answer length:
  vlbridge       the service's executor (in process), closed-loop clients at each concurrency
  sequential     plain `model.generate`, one request at a time (a FastAPI-style server)
  static         plain `model.generate` on a static batch of `concurrency` requests
  static+compile `generate(..., cache_implementation="static")` with torch.compile, static batch

Every answer has exactly `--new-tokens` tokens (min = max), pictures are `--image-size`
squares of noise (JPEG). GPU models use random weights: the numbers measure speed only.
The sequential baseline is measured on a few requests and extended to the closed loop
analytically (FIFO, one at a time: throughput 1/service, latency c x service) - labelled so.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image

from protocol.pictures import ImageLimits
from server.inference.api import Done, InferenceRequest, SamplingParams, Turn
from server.inference.executor import ExecutorLimits, InferenceExecutor

QUESTION = "Describe this picture in detail."


def noise_jpeg(size: int, seed: int) -> bytes:
    import numpy as np

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def distinct_jpegs(size: int, count: int, first_seed: int = 0) -> list[bytes]:
    """*count* different noise JPEGs, made on all cores (call before CUDA is initialised: forks)."""
    from concurrent.futures import ProcessPoolExecutor

    seeds = range(first_seed, first_seed + count)
    workers = min(16, os.cpu_count() or 1)
    if workers == 1 or count <= 8:
        return [noise_jpeg(size, seed) for seed in seeds]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(noise_jpeg, [size] * count, seeds, chunksize=8))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


class GpuBusy:
    """Samples NVML utilization (percent of time a kernel ran) in the background."""

    def __init__(self, device_index: int = 0) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            self._nvml = pynvml
        except Exception:
            self._nvml = None

    def __enter__(self) -> GpuBusy:
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu / 100)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    @property
    def fraction(self) -> float | None:
        return round(statistics.mean(self.samples), 3) if self.samples else None


# ---- vlbridge executor ------------------------------------------------------------------------------


async def run_vlbridge(
    engine: Any, images: list[bytes], concurrency: int, requests: int, tokens: int, offset: int = 0
) -> dict[str, Any]:
    """Closed loop of *concurrency* clients; request n sends images[(offset + n) % len(images)]."""
    limits = ExecutorLimits(
        max_batch=max(concurrency, 1), queue_size=4 * requests, request_timeout=600, max_new_tokens=tokens
    )
    workers = min(8, os.cpu_count() or 1)
    executor = InferenceExecutor(
        lambda _progress: engine, limits, model_name="bench", prepare_workers=workers
    )
    await executor.start()
    await executor.wait_ready(60)
    params = SamplingParams(max_new_tokens=tokens, min_new_tokens=tokens)
    ttft: list[float] = []
    latency: list[float] = []
    finished: list[float] = []  # completion times of requests issued after the first wave
    issued = 0

    async def client(index: int) -> None:
        nonlocal issued
        while issued < requests:
            number = issued
            issued += 1
            turns = [Turn.user(QUESTION, [images[(offset + number) % len(images)]])]
            async for event in executor.submit(InferenceRequest(f"c{index}-{number}", turns, params)):
                if isinstance(event, Done):
                    assert event.usage.completion_tokens == tokens, event.usage
                    if number >= warm_wave:  # the first wave arrives all at once: not steady state
                        ttft.append(event.timings.first_token)
                        latency.append(event.timings.total)
                        finished.append(time.monotonic())
                    else:
                        first_wave_done.append(time.monotonic())
                elif event.type == "error":
                    raise RuntimeError(f"request failed: {event}")

    warm_wave = concurrency if concurrency > 1 else 1
    first_wave_done: list[float] = []
    executor.step_times.clear()
    with GpuBusy() as busy:
        await asyncio.gather(*[client(i) for i in range(concurrency)])
    steps = sorted(executor.step_times)
    await executor.stop()
    # Throughput over the steady-state window: from the median first-wave completion to the end.
    start = statistics.median(first_wave_done)
    window = [t for t in finished if t > start]
    if not window:
        return {"requests": 0}
    wall = max(window) - start
    return {
        "requests": len(window),
        "wall": wall,
        "rps": len(window) / wall,
        "tok_s": len(window) * tokens / wall,
        "ttft_p50": pct(ttft, 50),
        "ttft_p95": pct(ttft, 95),
        "lat_p50": pct(latency, 50),
        "lat_p95": pct(latency, 95),
        "step_ms": 1000 * pct(steps, 50),
        "gpu_busy": busy.fraction,
    }


class _KeepEngine:
    """Lets several executors reuse one loaded engine (the bench restarts the executor per level)."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def close(self) -> None:
        pass


# ---- stock transformers baselines -------------------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def generate_batch(
    runner: Any, images: list[bytes], batch: int, tokens: int, compiled: bool = False
) -> float:
    """Wall seconds for one static batch through stock generate (preprocessing included)."""
    started = time.monotonic()
    prompts = [runner.prompts.build([Turn.user(QUESTION, [images[i % len(images)]])]) for i in range(batch)]
    inputs = runner.model_inputs(prompts)
    extra: dict[str, Any] = {}
    if compiled:
        extra = {"cache_implementation": "static", "compile_config": None}
        extra.pop("compile_config")
    out = runner.model.generate(
        **inputs,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        pad_token_id=runner.pad_token_id,
        **extra,
    )
    _sync(str(runner.device))
    assert out.shape[1] - inputs["input_ids"].shape[1] == tokens
    return time.monotonic() - started


def run_static(
    runner: Any, images: list[bytes], concurrency: int, tokens: int, compiled: bool
) -> dict[str, Any]:
    import torch

    repeats = 3 if concurrency == 1 else 1
    with torch.inference_mode():
        warm = generate_batch(
            runner, images, concurrency, tokens if compiled else 2, compiled
        )  # compile here
        with GpuBusy() as busy:
            wall = statistics.median(
                generate_batch(runner, images, concurrency, tokens, compiled) for _ in range(repeats)
            )
        prefill = statistics.median(generate_batch(runner, images, concurrency, 1) for _ in range(repeats))
    step = (wall - prefill) / max(1, tokens - 1)
    return {
        "requests": concurrency,
        "wall": wall,
        "rps": concurrency / wall,
        "tok_s": concurrency * tokens / wall,
        "ttft_p50": prefill,
        "ttft_p95": prefill,
        "lat_p50": wall,
        "lat_p95": wall,
        "step_ms": 1000 * step,
        "gpu_busy": busy.fraction,
        "warmup_s": warm if compiled else None,
    }


def sequential_from(single: dict[str, Any], concurrencies: list[int]) -> dict[int, dict[str, Any]]:
    """Plain generate serving one request at a time, from its measured batch-1 numbers.

    FIFO single server with c closed-loop clients: throughput 1/service; a request waits for
    the c-1 ahead of it.
    """
    service, prefill = single["lat_p50"], single["ttft_p50"]
    return {
        c: {
            **single,
            "requests": single["requests"],
            "rps": 1 / service,
            "tok_s": single["tok_s"],
            "ttft_p50": (c - 1) * service + prefill,
            "ttft_p95": (c - 1) * service + prefill,
            "lat_p50": c * service,
            "lat_p95": c * service,
            "derived": True,
        }
        for c in concurrencies
    }


# ---- cold start -------------------------------------------------------------------------------------


def cold_start(model_dir: str, device: str, max_batch: int) -> dict[str, Any]:
    """Seconds from `vlbridge serve` process start until /health says healthy."""
    import socket
    import subprocess
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "VLBRIDGE_MODEL_PATH": model_dir,
        "VLBRIDGE_MODEL_DEVICE": device,
        "VLBRIDGE_SERVER_PORT": str(port),
        "VLBRIDGE_EXECUTOR_MAX_BATCH": str(max_batch),
        "VLBRIDGE_STORAGE_PATH": tempfile.mkdtemp(),
    }
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve"],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    states: list[Any] = []
    try:
        while time.monotonic() - started < 300:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited: {proc.stdout.read() if proc.stdout else ''}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    body = json.loads(response.read())
                    if body["status"] == "healthy":
                        return {"cold_start_s": time.monotonic() - started, "states": states[-3:]}
            except Exception as exc:  # 503 while loading, connection refused before listening
                states.append(str(exc)[:60])
            time.sleep(0.2)
        raise RuntimeError("not healthy within 300 s")
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        print(out[-3000:] if out else "", file=sys.stderr)


# ---- main -------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="demo", help="demo | 2b | 8b | 30b-a3b | a checkpoint directory")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--concurrency", default=None, help="comma list (default 1,8,32,64; cpu: 1,4,8)")
    parser.add_argument("--systems", default="vlbridge,sequential,static,static+compile")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128 (cpu: 16)")
    parser.add_argument("--image-size", type=int, default=None, help="default 1024 (cpu: 224)")
    parser.add_argument("--rounds", type=float, default=4.0, help="requests per client at each level")
    parser.add_argument("--cold-start", action="store_true", help="also time `vlbridge serve` to healthy")
    parser.add_argument("--workdir", default=None, help="where random-weight checkpoints are written")
    parser.add_argument("--in-memory", action="store_true", help="build the random model in GPU memory only")
    parser.add_argument(
        "--kv-fraction", type=float, default=0.85, help="free GPU memory given to the KV cache"
    )
    parser.add_argument(
        "--kv-cache-dtype", default="auto", choices=["auto", "fp8"], help="model.kv_cache_dtype"
    )
    parser.add_argument(
        "--weights-dtype", default="auto", choices=["auto", "fp8"], help="model.weights_dtype"
    )
    parser.add_argument("--out", default=None, help="write results as JSON here")
    args = parser.parse_args()

    cpu = args.device == "cpu"
    levels = [int(c) for c in (args.concurrency or ("1,4,8" if cpu else "1,8,32,64")).split(",")]
    tokens = args.new_tokens or (16 if cpu else 128)
    size = args.image_size or (224 if cpu else 1024)
    dtype = args.dtype or ("float32" if cpu else "bfloat16")
    systems = args.systems.split(",")
    if cpu:
        systems = [s for s in systems if s != "static+compile"]  # minutes of compile per shape on 2 cores

    def requests_at(c: int) -> int:
        return max(c, int(c * args.rounds)) if c > 1 else max(3, int(args.rounds * 2))

    # A picture is never sent twice to the executor (a vision-encoder cache would flatter it);
    # made before torch is imported, since the pool forks.
    images = distinct_jpegs(size, sum(requests_at(c) + 2 for c in levels))

    from server.inference.model.demo import build_demo_model
    from server.inference.model.model_engine import EngineOptions, ModelEngine
    from server.inference.picture_processes import prepare_processes

    work = Path(args.workdir or tempfile.mkdtemp(prefix="vlbridge-bench-"))
    demo = None if Path(args.model).is_dir() else build_demo_model(work / "demo")
    info: dict[str, Any] = {
        "model": args.model,
        "device": args.device,
        "dtype": dtype,
        "new_tokens": tokens,
        "image": f"{size}x{size} JPEG noise",
        "date": time.strftime("%Y-%m-%d"),
        "host": platform.node(),
        "python": platform.python_version(),
    }
    if args.model == "demo":
        assert demo is not None
        model_dir = str(demo)
        info["weights"] = "demo (random)"
    elif Path(args.model).is_dir():
        model_dir = args.model
        info["weights"] = "checkpoint"
    elif args.in_memory:
        model_dir = ""
        info["weights"] = "RANDOM (real architecture, meaningless answers), built in memory"
    else:
        from bench.architectures import build_checkpoint

        assert demo is not None  # an architecture's name, not a folder
        model_dir = str(work / args.model)
        info["build_s"] = round(build_checkpoint(args.model, Path(model_dir), demo, dtype), 1)
        info["weights"] = "RANDOM (real architecture, meaningless answers)"
    import torch

    info["torch"] = torch.__version__
    if not cpu:
        info["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(info), flush=True)
    if args.cold_start:
        info["cold_start"] = cold_start(model_dir, args.device, max(levels))
        print(json.dumps(info["cold_start"]), flush=True)

    results: dict[str, dict[int, dict[str, Any]]] = {s: {} for s in systems}

    def save() -> None:  # after every measurement: a run cut short still leaves its numbers
        if args.out:
            Path(args.out).write_text(json.dumps({"info": info, "results": results}, indent=1, default=str))

    limits = ImageLimits(max_pixels=max(size * size, 32 * 32 * 4))
    loaded: Any = None
    if "vlbridge" in systems:
        load_started = time.monotonic()
        options = EngineOptions(
            max_batch=max(levels),
            max_context_tokens=size * size // 1024 + 256,
            max_new_tokens=tokens,
            memory_fraction=args.kv_fraction,
            kv_cache_dtype=args.kv_cache_dtype,
            weights_dtype=args.weights_dtype,
            # as `vlbridge serve` sizes them (executor.prepare_processes = -1): like for like
            prepare_processes=prepare_processes(-1, os.cpu_count() or 1),
        )
        if args.in_memory:
            from bench.architectures import load_in_memory
            from server.inference.model.runner import ModelRunner

            assert demo is not None, "--in-memory takes an architecture's name"
            loaded = load_in_memory(args.model, demo, dtype)
            engine = ModelEngine(ModelRunner(loaded, limits, options.max_context_tokens), options)
            engine.warm_up()
        else:
            engine = ModelEngine.load(
                model_dir, device=args.device, dtype=dtype, limits=limits, options=options
            )
        info["engine_load_s"] = round(time.monotonic() - load_started, 1)
        info["graph_capture_s"] = round(engine.capture_seconds, 1)
        shared = _KeepEngine(engine)
        offset = 0
        for c in levels:
            requests = requests_at(c)
            asyncio.run(run_vlbridge(shared, images, min(c, 2), 2, tokens, offset))  # warm this bucket's path
            results["vlbridge"][c] = asyncio.run(
                run_vlbridge(shared, images, c, requests, tokens, offset + 2)
            )
            offset += requests + 2
            print("vlbridge", c, json.dumps(results["vlbridge"][c]), flush=True)
            save()
        engine.close()
        del engine, shared
        loaded = None  # an in-memory model too: two copies of 30B-A3B do not fit
        import gc

        gc.collect()
        if not cpu:
            from server.inference.model.kernels import restore_stock_functions

            restore_stock_functions()  # the baselines below run stock transformers code
    runner = None
    if any(name in systems for name in ("sequential", "static", "static+compile")):
        from server.inference.model.runner import ModelRunner

        if args.in_memory:
            from bench.architectures import load_in_memory

            if not cpu:
                torch.cuda.empty_cache()
            assert demo is not None, "--in-memory takes an architecture's name"
            runner = ModelRunner(load_in_memory(args.model, demo, dtype), limits, size * size // 1024 + 256)
        else:
            runner = ModelRunner.load(
                model_dir,
                device=args.device,
                dtype=dtype,
                limits=limits,
                max_context_tokens=size * size // 1024 + 256,
            )
    if not cpu:
        torch.cuda.empty_cache()
    for name in ("static", "static+compile"):
        if name in systems or (name == "static" and "sequential" in systems):
            for c in levels if name in systems else [1]:
                try:
                    results[name][c] = run_static(
                        runner, images, c, tokens, compiled=name == "static+compile"
                    )
                except Exception as exc:  # e.g. out of memory at a large static batch
                    results[name][c] = {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}
                print(name, c, json.dumps(results[name][c]), flush=True)
                save()
                if not cpu:
                    torch.cuda.empty_cache()

    if "sequential" in systems:
        single = results["static"].get(1)
        if single and "error" not in single:
            results["sequential"] = sequential_from(single, levels)
        if "static" not in systems:
            results.pop("static")
    print_table(info, results, levels)
    save()


def print_table(
    info: dict[str, Any], results: dict[str, dict[int, dict[str, Any]]], levels: list[int]
) -> None:
    print(
        f"\n{info['model']} on {info.get('gpu', info['device'])}, {info['dtype']}, {info['image']}, "
        f"{info['new_tokens']} forced new tokens, weights {info['weights']}"
    )
    header = (
        "system",
        "conc",
        "req/s",
        "tok/s",
        "TTFT p50",
        "TTFT p95",
        "lat p50",
        "lat p95",
        "ms/step",
        "GPU busy",
        "x seq",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for c in levels:
        base = results.get("sequential", {}).get(c, {}).get("rps")
        for system, by_level in results.items():
            r = by_level.get(c)
            if not r:
                continue
            if "error" in r or "rps" not in r:
                print(f"| {system} | {c} | {r.get('error', 'no request finished after the first wave')} |")
                continue
            ratio = f"{r['rps'] / base:.1f}x" if base else ""
            busy = f"{r['gpu_busy']:.0%}" if r.get("gpu_busy") is not None else "-"
            mark = "*" if r.get("derived") else ""
            print(
                f"| {system}{mark} | {c} | {r['rps']:.2f} | {r['tok_s']:.0f} | {r['ttft_p50']:.2f} | "
                f"{r['ttft_p95']:.2f} | {r['lat_p50']:.2f} | {r['lat_p95']:.2f} | {r['step_ms']:.1f} | "
                f"{busy} | {ratio} |"
            )
    print("* sequential: static batch-1 service time, closed loop derived (FIFO, one at a time)")
    print("vlbridge rows: steady state after the first wave of `conc` simultaneous arrivals")
    for key in ("cold_start", "engine_load_s", "graph_capture_s", "build_s"):
        if key in info:
            print(f"{key}: {info[key]}")


if __name__ == "__main__":
    main()
