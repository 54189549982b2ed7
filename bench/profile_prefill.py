"""Where does the engine's GPU time go? The prefill phases and the decode step, by kernel.

For 1 and 4 new 1024x1024 pictures: the vision encoder (`VisionEncoder.encode`, its cache off)
and the packed language-model forward (`PrefillForward.run`), each timed (best of 3, host and
device) and then profiled once: the kernels that take the most device time. Then the decode step
(`--decode-rows`, default 64, 0: none) over rows of `--decode-context` tokens (text prompts,
prefilled first), timed and profiled the same way (a CUDA graph replay on a GPU).

python bench/profile_prefill.py --model 2b [--out profile.txt]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.architectures import load_in_memory
from bench.executor import noise_jpeg
from server.inference.api import SamplingParams, Turn
from server.inference.engine import Sequence
from server.inference.model.demo import build_demo_model
from server.inference.model.model_engine import EngineOptions, ModelEngine
from server.inference.model.prefill import pack
from server.inference.model.runner import ModelRunner


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Any, repeats: int = 3) -> tuple[float, float]:
    """(host seconds to launch, seconds until the device is done), best of *repeats*."""
    fn()
    sync()
    host, device = float("inf"), float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        launched = time.perf_counter()
        sync()
        host = min(host, launched - started)
        device = min(device, time.perf_counter() - started)
    return host, device


def kernels(fn: Any, rows: int = 22) -> str:
    cuda = torch.cuda.is_available()
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        fn()
        sync()
    order = "cuda_time_total" if cuda else "cpu_time_total"
    return str(prof.key_averages().table(sort_by=order, row_limit=rows, max_name_column_width=70))


@torch.inference_mode()  # as the server runs the engine: the vision graphs refuse tensors made outside
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="2b", help="2b | 8b | 30b-a3b | demo (a CPU dry run)")
    parser.add_argument("--pictures", default="1,4")
    parser.add_argument("--decode-rows", type=int, default=64)
    parser.add_argument("--decode-context", type=int, default=1100, help="tokens of each decode row")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import tempfile

    from protocol.pictures import ImageLimits

    demo = build_demo_model(Path(tempfile.mkdtemp()) / "demo")
    if args.model == "demo":
        from server.inference.model.loader import load_model

        loaded = load_model(str(demo), "cpu", "float32")
    else:
        loaded = load_in_memory(args.model, demo)
    runner = ModelRunner(loaded, ImageLimits(max_pixels=1024 * 1024), 8192)
    options = EngineOptions(max_batch=max(8, args.decode_rows), max_context_tokens=8192, vision_cache_bytes=0)
    engine = ModelEngine(runner, options)
    engine.warm_up()
    device, dtype = runner.device, runner.dtype
    report: list[str] = []
    for count in [int(c) for c in args.pictures.split(",")]:
        seqs = [
            Sequence(
                str(i),
                engine.prepare([Turn.user("Describe.", [noise_jpeg(1024, 100 + i)])]),
                SamplingParams(),
                4,
            )
            for i in range(count)
        ]
        for seq in seqs:
            assert engine.reserve(seq)
        pictures = [p.picture for seq in seqs for p in seq.prompt.data.pictures]
        encoded = engine.vision.encode(pictures, device, dtype)
        embeds = torch.cat([e.embeds for e in encoded])
        deepstack = [torch.cat(level) for level in zip(*(e.deepstack for e in encoded), strict=True)]
        rows = [(s.prompt.data.prompt.input_ids, s.prompt.data.positions, engine_slots(s), 0) for s in seqs]
        batch = pack(rows, [], runner.prompts.image_token_id, device)

        def vision() -> None:
            with engine._attention():
                engine.vision.encode(pictures, device, dtype)

        def forward() -> None:
            with engine._attention():
                engine.forward.run(batch, embeds, deepstack)

        for name, fn in (("vision", vision), ("forward", forward)):
            report += measured(f"{name}, {count} picture(s), {batch.query_starts[-1]} tokens", fn)
        for seq in seqs:
            engine.release(seq)
    if args.decode_rows:
        report += decode_step(engine, args.decode_rows, args.decode_context)
    if args.out:
        Path(args.out).write_text("\n".join(report))


def measured(title: str, fn: Any) -> list[str]:
    """*fn* timed (host, device) and profiled by kernel: the report's lines, printed as they come."""
    host, done = timed(fn)
    lines = [f"{title}: host {host * 1e3:.1f} ms, device done {done * 1e3:.1f} ms", kernels(fn)]
    for line in lines:
        print(line, flush=True)
    return lines


def decode_step(engine: ModelEngine, rows: int, context: int) -> list[str]:
    """One decode step over *rows* text rows of about *context* tokens each (prefilled 8 at a time)."""

    def text(count: int) -> str:
        return " ".join(f"w{i % 97}" for i in range(count))

    per_word = engine.prepare([Turn.user(text(100))]).length / 100  # tokens a word, with this tokenizer
    words = text(max(1, int(context / per_word)))
    seqs = [
        Sequence(f"d{i}", engine.prepare([Turn.user(f"{i} {words}")]), SamplingParams(), 64)
        for i in range(rows)
    ]
    for start in range(0, rows, 8):
        chunk = seqs[start : start + 8]
        for seq in chunk:
            assert engine.reserve(seq), "no room for the decode rows: lower --decode-rows or --decode-context"
        for seq, token in zip(chunk, engine.prefill(chunk).tokens(), strict=True):
            seq.tokens.append(token)

    def step() -> None:
        for seq, token in zip(seqs, engine.decode(seqs).tokens(), strict=True):
            seq.tokens.append(token)

    tokens = seqs[0].prompt.length
    lines = measured(f"decode step, {rows} rows of ~{tokens} tokens", step)
    for seq in seqs:
        engine.release(seq)
    return lines


def engine_slots(seq: Sequence) -> torch.Tensor:
    from server.inference.model.model_engine import _slots

    return _slots(seq.state.cache.pages, 0, seq.prompt.length)


if __name__ == "__main__":
    main()
