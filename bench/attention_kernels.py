"""Which attention kernel for the two places the GPU spends most of its attention time?

1. The vision encoder: full (non-causal) attention over each picture's patches, head dim 64, 16
   heads (Qwen3-VL-2B); a 1024x1024 picture is 4096 patches. Today transformers' SDPA path calls
   `scaled_dot_product_attention` once per picture (torch picks FA2).
2. The decode step: one query token per row over its paged KV cache (pages of 64 tokens), 16
   query heads over 8 KV heads, head dim 128. Today our Triton kernel (`attention.py`).

Each candidate is timed on the device (CUDA events, median of 20 after warm-up), its first call
timed separately (plan building / JIT compilation), and its output compared with the reference.
Candidates that are not installed are reported as such: torch's cuDNN attention and FlashAttention
4 (`flash_attn.cute`, the CuTe-DSL kernels, Hopper and Blackwell).

python bench/attention_kernels.py [--out attention.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from server.inference.model.attention import paged_attention_triton
from server.inference.model.kvcache import PAGE


def device_ms(fn: Callable[[], Any], repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def first_call_s(fn: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max())


def fa4() -> Any:
    try:
        from flash_attn.cute import interface
    except Exception as exc:
        print(f"flash_attn.cute: not available ({type(exc).__name__}: {exc})")
        return None
    return interface


def vision(results: dict[str, Any], sizes: list[int], heads: int = 16, dim: int = 64) -> None:
    name = "vision " + "+".join(str(s) for s in sizes)
    dtype, dev = torch.bfloat16, torch.device("cuda")
    total = sum(sizes)
    q, k, v = (torch.randn(total, heads, dim, device=dev, dtype=dtype) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    flops = sum(4 * s * s * heads * dim for s in sizes)
    splits = [(int(cu[i]), int(cu[i + 1])) for i in range(len(sizes))]

    def per_picture(backend: SDPBackend) -> torch.Tensor:
        out = torch.empty_like(q)
        with sdpa_kernel([backend]):
            for a, b in splits:
                qq, kk, vv = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
                out[a:b] = F.scaled_dot_product_attention(qq, kk, vv).squeeze(0).transpose(0, 1)
        return out

    want = per_picture(SDPBackend.FLASH_ATTENTION)
    row: dict[str, Any] = {}

    def measure(label: str, fn: Callable[[], torch.Tensor]) -> None:
        try:
            first = first_call_s(fn)
            err = error(fn(), want)
            ms = device_ms(fn)
        except Exception as exc:
            row[label] = {"failed": f"{type(exc).__name__}: {str(exc)[:300]}"}
            return
        row[label] = {
            "ms": round(ms, 3),
            "tflops": round(flops / ms / 1e9, 1),
            "first_s": round(first, 3),
            "max_abs_err": round(err, 5),
        }

    measure("sdpa_flash_per_picture", lambda: per_picture(SDPBackend.FLASH_ATTENTION))
    measure("sdpa_cudnn_per_picture", lambda: per_picture(SDPBackend.CUDNN_ATTENTION))
    try:
        from torch.nn.attention.varlen import varlen_attn

        mx = max(sizes)
        measure("torch_varlen_fa2", lambda: varlen_attn(q, k, v, cu, cu, mx, mx))
    except ImportError:
        row["torch_varlen_fa2"] = {"failed": "no torch.nn.attention.varlen"}
    interface = fa4()
    if interface is not None:
        mx = max(sizes)
        measure(
            "fa4_varlen",
            lambda: interface._flash_attn_fwd(
                q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=mx, max_seqlen_k=mx
            )[0],
        )
    results[name] = row
    print(name, json.dumps(row))


def decode(
    results: dict[str, Any], rows: int, context: int, heads: int = 16, kv_heads: int = 8, dim: int = 128
) -> None:
    name = f"decode rows={rows} context~{context}"
    dtype, dev = torch.bfloat16, torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(context - 100, context + 100, (rows,), generator=gen)
    pages_per_row = (lengths + PAGE - 1) // PAGE
    max_pages = int(pages_per_row.max())
    total_pages = int(pages_per_row.sum()) + 8
    keys = torch.randn(total_pages, PAGE, kv_heads, dim, device=dev, dtype=dtype)
    values = torch.randn(total_pages, PAGE, kv_heads, dim, device=dev, dtype=dtype)
    perm = torch.randperm(total_pages, generator=gen)
    table = torch.zeros(rows, max_pages, dtype=torch.int32)
    at = 0
    for r in range(rows):
        n = int(pages_per_row[r])
        table[r, :n] = perm[at : at + n].to(torch.int32)
        at += n
    table = table.to(dev)
    lens = lengths.to(torch.int32).to(dev)
    q = torch.randn(rows, heads, dim, device=dev, dtype=dtype)
    scale = dim**-0.5
    kv_bytes = int(lengths.sum()) * kv_heads * dim * 2 * 2
    row: dict[str, Any] = {}
    want = paged_attention_triton(q, keys, values, table, lens, scale)

    def measure(label: str, fn: Callable[[], torch.Tensor], graph: bool = True) -> None:
        try:
            first = first_call_s(fn)
            err = error(fn(), want)
            ms = device_ms(fn)
            entry = {
                "ms": round(ms, 4),
                "GB_s": round(kv_bytes / ms / 1e6, 1),
                "first_s": round(first, 3),
                "max_abs_err": round(err, 5),
            }
            if graph:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    fn()
                entry["graph_ms"] = round(device_ms(g.replay), 4)
            row[label] = entry
        except Exception as exc:
            row[label] = {"failed": f"{type(exc).__name__}: {str(exc)[:300]}"}

    measure("triton_paged", lambda: paged_attention_triton(q, keys, values, table, lens, scale))
    interface = fa4()
    if interface is not None:
        q4 = q.unsqueeze(1)  # (rows, 1, heads, dim)

        def run4() -> torch.Tensor:
            out = interface._flash_attn_fwd(
                q4, keys, values, softmax_scale=scale, page_table=table, seqused_k=lens
            )[0]
            return out.squeeze(1)

        measure("fa4_paged", run4)
    results[name] = row
    print(name, json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for sizes in ([4096], [4096] * 5, [4096, 1024, 2304, 576, 3840]):
        vision(results, sizes)
    for rows, context in ((64, 1100), (32, 1100), (1, 1100), (64, 3000)):
        decode(results, rows, context)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
