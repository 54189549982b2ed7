"""Correctness checks that need a GPU: the Triton kernels and the engine in bf16.

    python bench/gpu_check.py [--model 2b] [--teacher-forcing-only] [--out results.json]

Teacher forcing (`check_teacher_forcing`): a batch of prompts with pictures of mixed sizes,
each followed by 32 fixed tokens. Stock transformers runs the whole of it in one forward;
the engine runs its prefill (every prompt position's logits kept) and then 32 decode steps
whose input token is forced to the fixed one. Logits are compared at every position: relative
error (L2 over the vocabulary) and top-1 agreement. A second round runs the same prompts again,
now through the prefix cache (only the last prompt token is computed) and the vision cache.
Unlike comparing greedy answers, this separates bf16 rounding (small errors, rare top-1 flips
between near-ties) from bugs (large errors from the position where they occur). With
`--weights-dtype fp8` the engine is also compared with stock transformers whose linear layers
round weights and activations as float8 does (`float8.simulated`): what float8 costs against
the plain model, whether the engine computes what it should against the simulated one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

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


def check_fused_kernels() -> None:
    """The fused kernels against the stock torch ops they replace (bf16 inputs, float64 reference)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

    from server.inference.model.kernels import qk_norm_rope_store, rms_norm, silu_mul

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    def ref_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x64 = x.double()
        return w.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)

    torch.manual_seed(1)
    x = torch.randn(37, 2048, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = torch.rand(2048, device="cuda", dtype=torch.bfloat16) + 0.5
    out, total = rms_norm(x, w, 1e-6, r)
    errors = {
        "rms_norm": rel(rms_norm(x, w, 1e-6), ref_norm(x, w)),
        "add": rel(total, x.double() + r.double()),
        "add+rms_norm": rel(out, ref_norm((x + r), w)),
    }
    gu = torch.randn(37, 2 * 6144, device="cuda", dtype=torch.bfloat16)
    g, u = gu.double().chunk(2, dim=-1)
    errors["silu_mul"] = rel(silu_mul(gu), torch.nn.functional.silu(g) * u)
    heads, kv_heads, dim, rows = 16, 8, 128, 5
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, device="cuda", dtype=torch.bfloat16)
    qw, kw = torch.rand(dim, device="cuda") + 0.5, torch.rand(dim, device="cuda") + 0.5
    angles = torch.rand(rows, dim // 2, device="cuda") * 6
    cos = torch.cat([angles.cos(), angles.cos()], -1).bfloat16()
    sin = torch.cat([angles.sin(), angles.sin()], -1).bfloat16()
    keys = torch.zeros(4, 64, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    values = torch.zeros_like(keys)
    slots = torch.tensor([3, 70, 71, 130, 255], device="cuda")
    q = qk_norm_rope_store(
        qkv, qw.bfloat16(), kw.bfloat16(), cos, sin, keys, values, slots, heads, kv_heads, dim, 1e-6
    )
    q_ref = ref_norm(qkv[:, : heads * dim].view(rows, heads, dim), qw.bfloat16())
    k_ref = ref_norm(qkv[:, heads * dim : (heads + kv_heads) * dim].view(rows, kv_heads, dim), kw.bfloat16())
    q_ref, k_ref = apply_rotary_pos_emb(
        q_ref.transpose(0, 1), k_ref.transpose(0, 1), cos.double(), sin.double(), 0
    )
    errors["q norm+rope"] = rel(q, q_ref.transpose(0, 1))
    errors["k norm+rope->cache"] = rel(keys.view(-1, kv_heads, dim)[slots], k_ref.transpose(0, 1))
    errors["v->cache"] = rel(
        values.view(-1, kv_heads, dim)[slots], qkv[:, (heads + kv_heads) * dim :].view(rows, kv_heads, dim)
    )
    from transformers.models.qwen3_vl.modeling_qwen3_vl import rotate_half

    from server.inference.model.kernels import _vision_rope_one

    qkv_v = torch.randn(999, 3, 16, 72, device="cuda", dtype=torch.bfloat16).permute(1, 0, 2, 3)
    vq = qkv_v[0]
    vcos, vsin = torch.rand(999, 72, device="cuda"), torch.rand(999, 72, device="cuda")
    ref_v = vq.double() * vcos.unsqueeze(-2).double() + rotate_half(vq.double()) * vsin.unsqueeze(-2).double()
    errors["vision rope (dim 72, strided)"] = rel(_vision_rope_one(vq, vcos, vsin), ref_v)
    for name, err in errors.items():
        print(f"fused {name}: relative error vs float64 {err:.2e}")
        assert err < 1e-2, name


async def check_engine(model: str) -> None:
    from bench.architectures import build_checkpoint
    from bench.executor import noise_jpeg
    from protocol.pictures import ImageLimits
    from server.inference.api import Done, InferenceRequest, SamplingParams, Turn
    from server.inference.executor import ExecutorLimits, InferenceExecutor
    from server.inference.model.demo import build_demo_model
    from server.inference.model.model_engine import EngineOptions, ModelEngine

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


def _compare(ours: torch.Tensor, reference: torch.Tensor) -> tuple[float, float, float]:
    """(max, median) relative L2 error per position and the top-1 agreement of (positions, vocab)."""
    ours, reference = ours.float(), reference.float().to(ours.device)
    err = (ours - reference).norm(dim=-1) / reference.norm(dim=-1).clamp_min(1e-6)
    top1 = (ours.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return err.max().item(), err.median().item(), top1


DEMOS = ("demo", "demo-moe")  # check_teacher_forcing on the CPU: the demo model, with experts
FLOAT8_REFERENCE = "against the float8 reference"  # float8.simulated: the same roundings, plain arithmetic


def _reference(runner: Any, extended: list[Any]) -> list[torch.Tensor]:
    """Stock transformers' logits at every position of each extended prompt, on the CPU."""
    with torch.inference_mode():
        inputs = runner.model_inputs(extended)
        logits = runner.model(**inputs).logits
        width = inputs["input_ids"].shape[1]
        reference = [logits[row, width - len(e) :].cpu() for row, e in enumerate(extended)]
    del logits, inputs
    return reference


def _summary(
    prefill: list[tuple[float, float, float]], decode: list[tuple[float, float, float]]
) -> dict[str, float]:
    return {
        "prefill_max_rel_err": max(e[0] for e in prefill),
        "prefill_median_rel_err": statistics.median(e[1] for e in prefill),
        "prefill_top1": statistics.mean(e[2] for e in prefill),
        "decode_max_rel_err": max(e[0] for e in decode),
        "decode_median_rel_err": statistics.median(e[1] for e in decode),
        "decode_top1": statistics.mean(e[2] for e in decode),
    }


def check_teacher_forcing(
    model: str,
    steps: int = 32,
    device: str = "cuda",
    kv_cache_dtype: Literal["auto", "fp8"] = "auto",
    weights_dtype: Literal["auto", "fp8"] = "auto",
) -> dict[str, object]:
    """Engine vs stock transformers by teacher forcing, bf16, a batch of mixed picture sizes.

    `model="demo", device="cpu"` runs the same check on the demo model in float32 (a dry run
    of this code: errors ~1e-6, top-1 agreement 1.0); "demo-moe" on its mixture-of-experts twin."""
    from dataclasses import replace

    from bench.architectures import load_in_memory
    from bench.executor import noise_jpeg
    from protocol.pictures import ImageLimits
    from server.inference.api import SamplingParams, Turn
    from server.inference.engine import Sequence
    from server.inference.model.demo import build_demo_model
    from server.inference.model.loader import load_model
    from server.inference.model.model_engine import EngineOptions, ModelEngine
    from server.inference.model.runner import ModelRunner

    started = time.monotonic()
    work = Path(tempfile.mkdtemp())
    demo = build_demo_model(work / "demo")
    if model in DEMOS:
        checkpoint = build_demo_model(work / model, experts=True) if model == "demo-moe" else demo
        loaded = load_model(str(checkpoint), device, "float32" if device == "cpu" else "bfloat16")
    else:
        loaded = load_in_memory(model, demo)
    runner = ModelRunner(loaded, ImageLimits(), 4096)
    sizes = [224, 352, 480, 640, 800, 1024] if device != "cpu" else [64, 96, 160]
    convs = [
        [Turn.user(f"Question {i}: what is in it?", [noise_jpeg(size, 50 + i)])]
        for i, size in enumerate(sizes)
    ]
    vocab = int(runner.model.config.text_config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    low = min(1000, vocab // 2)  # past the special tokens
    forced = [torch.randint(low, vocab, (steps,), generator=generator).tolist() for _ in convs]
    prompts = [runner.prompts.build(turns) for turns in convs]
    lengths = [len(p) for p in prompts]
    extended = [replace(p, input_ids=p.input_ids + f) for p, f in zip(prompts, forced, strict=True)]
    if device != "cpu":
        from server.inference.model.kernels import restore_stock_functions

        restore_stock_functions()
    references = {"stock": _reference(runner, extended)}
    if weights_dtype == "fp8":  # the same float8 roundings in plain arithmetic: bugs apart from rounding
        from server.inference.model.float8 import simulated

        with simulated(runner.model):
            references[FLOAT8_REFERENCE] = _reference(runner, extended)
    if device != "cpu":
        torch.cuda.empty_cache()
    print(f"teacher forcing {model}: stock forward over {sum(map(len, extended))} tokens done")

    engine = ModelEngine(
        runner,
        EngineOptions(
            max_batch=8,
            max_context_tokens=4096,
            max_new_tokens=steps + 8,
            memory_fraction=0.4,
            kv_cache_dtype=kv_cache_dtype,
            weights_dtype=weights_dtype,
        ),
    )
    engine.warm_up()
    engine.keep_logits = True
    report: dict[str, object] = {"sizes": sizes, "prompt_tokens": lengths, "steps": steps}
    for name in ("cold", "prefix cache", "vision cache"):
        if name == "vision cache":
            engine.prefix = None  # pictures now come from the vision-encoder cache
        seqs = [
            Sequence(f"tf{i}", engine.prepare(turns), SamplingParams(max_new_tokens=steps + 1), steps + 2)
            for i, turns in enumerate(convs)
        ]
        for seq in seqs:
            assert engine.reserve(seq)
        prefill: dict[str, list[tuple[float, float, float]]] = {ref: [] for ref in references}
        decode: dict[str, list[tuple[float, float, float]]] = {ref: [] for ref in references}
        with torch.inference_mode():
            engine.prefill(seqs)
            full = engine.prefill_logits
            assert full is not None
            reused = [seq.state.reused for seq in seqs]
            for ref, logits in references.items():
                for row, (n, r) in enumerate(zip(lengths, reused, strict=True)):
                    prefill[ref].append(_compare(full[row], logits[row][r:n]))
            cells = torch.tensor([seq.state.cell for seq in seqs], device=device)
            for k in range(steps):
                engine.step.tokens[cells] = torch.tensor([f[k] for f in forced], device=device)
                engine.decode(seqs)
                step_logits = engine.step.logits[: len(seqs)].clone()
                for ref, logits in references.items():
                    for row, n in enumerate(lengths):
                        decode[ref].append(
                            _compare(step_logits[row : row + 1], logits[row][n + k : n + k + 1])
                        )
        for seq in seqs:
            engine.release(seq)
        result: dict[str, object] = {"reused_tokens": reused, **_summary(prefill["stock"], decode["stock"])}
        if FLOAT8_REFERENCE in references:
            result[FLOAT8_REFERENCE] = _summary(prefill[FLOAT8_REFERENCE], decode[FLOAT8_REFERENCE])
        report[name] = result
        print(f"teacher forcing {model} [{name}]: {json.dumps(result)}", flush=True)
    report["vision_cache_hits"] = engine.vision.hits
    report["seconds"] = round(time.monotonic() - started, 1)
    engine.close()
    del engine, runner, loaded, references
    if device != "cpu":
        torch.cuda.empty_cache()
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo")
    parser.add_argument("--teacher-forcing-only", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the teacher-forcing check")
    parser.add_argument("--demo", default="demo", choices=DEMOS, help="the demo model a dry run checks")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"], help="the engine's")
    parser.add_argument("--weights-dtype", default="auto", choices=["auto", "fp8"], help="the engine's")
    args = parser.parse_args()
    if args.device == "cpu":
        report = check_teacher_forcing(args.demo, 8, "cpu", args.kv_cache_dtype, args.weights_dtype)
        print(json.dumps(report, indent=1))
        sys.exit(0)
    results: dict[str, object] = {"model": args.model}
    if not args.teacher_forcing_only:
        check_kernel()
        check_fused_kernels()
        asyncio.run(check_engine(args.model))
    if args.model != "demo":
        results["teacher_forcing"] = check_teacher_forcing(
            args.model, kv_cache_dtype=args.kv_cache_dtype, weights_dtype=args.weights_dtype
        )
        results["kv_cache_dtype"] = args.kv_cache_dtype
        results["weights_dtype"] = args.weights_dtype
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
