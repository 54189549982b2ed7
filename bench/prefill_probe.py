"""Two suspects of slow time to first token, measured on a GPU in one go (about a minute).

    python bench/prefill_probe.py --model 2b [--out probe.json]

1. Attention with an explicit mask at shapes never seen before (what a follow-up's prefill
   does: ~150 new tokens over a ~1050-token reused prefix): the first call at each new
   (query, key) shape and a repeat, with torch's own kernel choice and with the engine's
   (`model_engine.PREFILL_ATTENTION`), plus the kernel each one ran. Then the engine's own
   prefill of text follow-ups about a cached 1024x1024 picture, each of a new length, both ways.
2. Picture preparation (`ModelEngine.prepare`: decode, image processor, positions) of 1024x1024
   JPEGs on 8 threads at once, with torch's default CPU threads (one per core) and with one,
   against one picture alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from bench.architectures import load_in_memory
from bench.executor import distinct_jpegs
from protocol.pictures import ImageLimits
from server.inference.api import SamplingParams, Turn
from server.inference.engine import Sequence
from server.inference.model import model_engine
from server.inference.model.demo import build_demo_model
from server.inference.model.loader import load_model
from server.inference.model.model_engine import EngineOptions, ModelEngine
from server.inference.model.runner import ModelRunner

PINNED = model_engine.PREFILL_ATTENTION


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _ms(fn: Any) -> float:
    _sync()
    started = time.perf_counter()
    fn()
    _sync()
    return (time.perf_counter() - started) * 1000


def _kernels(fn: Any) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA}
    return sorted(
        n[:80] for n in names if "ttention" in n or "fmha" in n or "sdpa" in n.lower() or "cudnn" in n
    )


def probe_sdpa() -> dict[str, Any]:
    """Masked SDPA at new shapes: cold and warm milliseconds, torch's choice vs the engine's."""
    heads, kv_heads, dim, prefix = 16, 8, 128, 1047
    report: dict[str, Any] = {}
    for name, backends in (("default", None), ("engine", PINNED)):
        rows = []
        for new in (151, 163, 177) if name == "default" else (152, 164, 178):
            keys = prefix + new
            q = torch.randn(1, heads, new, dim, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, kv_heads, keys, dim, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            mask = torch.ones(new, keys, dtype=torch.bool, device="cuda").tril(prefix)[None, None]

            def call(
                q: torch.Tensor = q, k: torch.Tensor = k, v: torch.Tensor = v, m: torch.Tensor = mask
            ) -> None:
                F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)

            if backends is None:
                cold, warm = _ms(call), _ms(call)
                kernels = _kernels(call)
            else:
                with sdpa_kernel(backends):
                    cold, warm = _ms(call), _ms(call)
                    kernels = _kernels(call)
            rows.append({"query": new, "keys": keys, "cold_ms": round(cold, 2), "warm_ms": round(warm, 3)})
        report[name] = {"calls": rows, "kernels": kernels}
        print(f"sdpa {name}: {json.dumps(report[name])}", flush=True)
    return report


def _seq(engine: ModelEngine, name: str, turns: list[Turn]) -> Sequence:
    seq = Sequence(name, engine.prepare(turns), SamplingParams(max_new_tokens=4), 4)
    assert engine.reserve(seq)
    return seq


def _prefill_ms(engine: ModelEngine, seq: Sequence) -> float:
    def run() -> None:
        seq.tokens.extend(engine.prefill([seq]).tokens())

    return _ms(run)


def probe_followups(engine: ModelEngine, picture: bytes) -> dict[str, Any]:
    """Text follow-ups about a cached picture, each of a new length: the engine's prefill time."""
    first = [Turn.user("Describe this picture in detail.", [picture])]
    seq = _seq(engine, "first", first)
    first_ms = _prefill_ms(engine, seq)
    engine.release(seq)
    report: dict[str, Any] = {"first_question_ms": round(first_ms, 1)}
    for name, backends in (("default", None), ("engine", PINNED)):
        model_engine.PREFILL_ATTENTION = backends
        rows = []
        for k in range(4):
            words = " ".join(["more"] * (20 + 7 * k + (40 if name == "engine" else 0)))
            turns = [*first, Turn.assistant(f"It is noise, take {k}."), Turn.user(f"And {words}?")]
            seq = _seq(engine, f"{name}{k}", turns)
            ms = _prefill_ms(engine, seq)
            rows.append({"reused": seq.state.reused, "prompt": seq.prompt.length, "ms": round(ms, 1)})
            engine.release(seq)
        report[name] = rows
        print(f"follow-up prefill {name}: first question {first_ms:.1f} ms; {json.dumps(rows)}", flush=True)
    model_engine.PREFILL_ATTENTION = PINNED
    return report


def probe_prepare(engine: ModelEngine, pictures: list[bytes]) -> dict[str, Any]:
    """Preparation of 1024x1024 pictures, 8 threads at once, per torch CPU-thread setting."""
    report: dict[str, Any] = {"image_processor": type(engine.runner.prompts.image_processor).__name__}
    cores = torch.get_num_threads()
    alone = []
    for data in pictures[:4]:
        started = time.perf_counter()
        engine.prepare([Turn.user("Describe.", [data])])
        alone.append((time.perf_counter() - started) * 1000)
    report["alone_ms"] = round(statistics.median(alone), 1)
    for threads in sorted({cores, 1}, reverse=True):
        torch.set_num_threads(threads)

        def one(data: bytes) -> float:
            started = time.perf_counter()
            engine.prepare([Turn.user("Describe.", [data])])
            return (time.perf_counter() - started) * 1000

        with ThreadPoolExecutor(8) as pool:  # fresh threads: torch applies its setting per thread
            started = time.perf_counter()
            times = list(pool.map(one, pictures))
            wall = time.perf_counter() - started
        report[f"torch_threads_{threads}"] = {
            "p50_ms": round(statistics.median(times), 1),
            "max_ms": round(max(times), 1),
            "pictures_per_s": round(len(pictures) / wall, 1),
        }
        print(
            f"prepare, 8 threads, torch threads {threads}: {json.dumps(report[f'torch_threads_{threads}'])}"
        )
    torch.set_num_threads(cores)
    print(f"prepare: {report['image_processor']}, one picture alone {report['alone_ms']} ms", flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="2b")
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run on the demo model, no SDPA part")
    args = parser.parse_args()
    torch.manual_seed(0)
    pictures = distinct_jpegs(1024, 40, first_seed=5000)  # forks: before CUDA starts
    report: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp())
    demo = build_demo_model(work / "demo")
    if args.device == "cpu":
        loaded = load_model(str(demo), "cpu", "float32")
    else:
        report["sdpa"] = probe_sdpa()
        loaded = load_in_memory(args.model, demo)
    runner = ModelRunner(loaded, ImageLimits(max_pixels=1024 * 1024), 4096)
    engine = ModelEngine(runner, EngineOptions(max_batch=8, max_context_tokens=4096, memory_fraction=0.3))
    engine.warm_up()
    report["followup"] = probe_followups(engine, pictures[-1])
    report["prepare"] = probe_prepare(engine, pictures[:32])
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
