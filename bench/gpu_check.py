"""Correctness checks that need a GPU: the Triton paged-attention kernel and the engine in bf16.

python bench/gpu_check.py [--model 2b]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from server.inference.model.attention import paged_attention_reference, paged_attention_triton
from server.inference.model.kvcache import PAGE


def check_kernel() -> None:
    torch.manual_seed(0)
    for heads, kv_heads in ((16, 8), (32, 8), (32, 4)):
        lengths = [1, 63, 64, 65, 700, 1290, 2049]
        pages = sum(-(-n // PAGE) for n in lengths) + 1
        keys = torch.randn(pages, PAGE, kv_heads, 128, device="cuda", dtype=torch.bfloat16)
        values = torch.randn_like(keys)
        perm = torch.randperm(pages - 1, device="cuda") + 1  # scattered pages, never the scratch page
        table = torch.zeros(
            len(lengths), max(-(-n // PAGE) for n in lengths), dtype=torch.int32, device="cuda"
        )
        used = 0
        for row, n in enumerate(lengths):
            count = -(-n // PAGE)
            table[row, :count] = perm[used : used + count]
            used += count
        query = torch.randn(len(lengths), heads, 128, device="cuda", dtype=torch.bfloat16)
        ref = paged_attention_reference(
            query.double(), keys.double(), values.double(), table, lengths, 128**-0.5
        )
        out = paged_attention_triton(
            query, keys, values, table, torch.tensor(lengths, dtype=torch.int32, device="cuda"), 128**-0.5
        )
        err = ((out.double() - ref).norm() / ref.norm()).item()
        print(f"paged attention heads {heads}/{kv_heads}: relative error vs float64 {err:.2e}")
        assert err < 1e-2 and not out.isnan().any()


async def check_engine(model: str) -> None:
    from bench.architectures import build_checkpoint
    from bench.executor import noise_jpeg
    from server.inference.api import Done, InferenceRequest, SamplingParams, Turn
    from server.inference.demo_model import build_demo_model
    from server.inference.executor import ExecutorLimits, InferenceExecutor
    from server.inference.images import ImageLimits
    from server.inference.model.engine import EngineOptions, ModelEngine

    work = Path(tempfile.mkdtemp())
    demo = build_demo_model(work / "demo")
    if model == "demo":
        path = demo
    else:
        path = work / model
        build_checkpoint(model, path, demo)
    engine = ModelEngine.load(
        str(path),
        device="cuda",
        dtype="bfloat16",
        limits=ImageLimits(),
        options=EngineOptions(max_batch=8, max_context_tokens=2048, max_new_tokens=32),
    )
    convs = [[Turn.user(f"question {i}", [noise_jpeg(224 + 96 * i, i)])] for i in range(6)]
    params = SamplingParams(max_new_tokens=24)
    started = time.monotonic()
    reference = engine.runner.generate_reference(convs, params)
    print(f"stock generate (batch {len(convs)}): {time.monotonic() - started:.2f} s")
    ex = InferenceExecutor(
        lambda _p: engine, ExecutorLimits(max_batch=8, max_new_tokens=32), model_name=model
    )
    await ex.start()
    await ex.wait_ready(60)

    async def ask(i: int) -> tuple[int, ...]:
        await asyncio.sleep(0.02 * i)
        events = [e async for e in ex.submit(InferenceRequest(str(i), convs[i], params))]
        assert isinstance(events[-1], Done), events[-1]
        return events[-1].token_ids

    ours = await asyncio.gather(*[ask(i) for i in range(len(convs))])
    same = sum(list(a) == b for a, b in zip(ours, reference, strict=True))
    prefix = [
        next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(b))
        for a, b in zip(ours, reference, strict=True)
    ]
    print(
        f"engine vs stock generate, bf16 greedy: {same}/{len(convs)} identical; first divergence at {prefix}"
    )
    await ex.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo")
    args = parser.parse_args()
    check_kernel()
    asyncio.run(check_engine(args.model))
