"""float8 weights (server/inference/model/float8.py) against bf16, GEMM by GEMM, on one GPU.

For each linear layer of a decoder layer of 2B, 8B and 30B-A3B (the experts of 30B-A3B as one
grouped GEMM over (token, expert) pairs routed at random, 8 of 128 experts a token, float8
through `torch._scaled_grouped_mm`, which the engine does not use: see float8.py): device time
of the bf16 GEMM (`F.linear`, `grouped_mm`) and of the float8 one, activation quantization
included, at 64 rows (a decode step at c=64) and 4096 rows (a prefill slice of ~4 pictures),
each timed as a CUDA graph of 10 calls, as the engine replays them (eager timing would add the
host's launch time); the float8 output's error against bf16 (relative to bf16's largest
value). Then the per-layer sums, i.e. what a decode step and a prefill slice would save.

python bench/float8_gemms.py [--out float8.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from server.inference.model import float8
from server.inference.model.agreement import relative_error

# (name, out, in) of each linear layer a decoder layer runs (q/k/v and gate/up fused, kernels.py)
LAYERS = {
    "2b": [("qkv", 4096, 2048), ("o", 2048, 2048), ("gate_up", 12288, 2048), ("down", 2048, 6144)],
    "8b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 24576, 4096), ("down", 4096, 12288)],
    "30b-a3b": [("qkv", 5120, 2048), ("o", 2048, 4096)],
}
EXPERTS = {"30b-a3b": (128, 8, 2048, 768)}  # experts, per token, hidden, intermediate
ROWS = (64, 4096)
CALLS = 10  # calls in a timed graph


def graph_ms(fn: Callable[[], Any], calls: int = CALLS) -> float:
    """Device time of one call of *fn*: a CUDA graph of *calls* calls, median of 10 replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def linear(out: int, inp: int, rows: int) -> dict[str, float]:
    weight = torch.randn(out, inp, device="cuda", dtype=torch.bfloat16) * inp**-0.5
    x = torch.randn(rows, inp, device="cuda", dtype=torch.bfloat16)
    fp8 = float8.Float8Linear(weight)
    return {
        "bf16_ms": graph_ms(lambda: F.linear(x, weight)),
        "fp8_ms": graph_ms(lambda: fp8(x)),
        "error": relative_error(fp8(x), F.linear(x, weight)),
    }


def experts(count: int, per_token: int, hidden: int, inter: int, rows: int) -> dict[str, dict[str, float]]:
    pairs = rows * per_token
    chosen = torch.rand(rows, count, device="cuda").topk(per_token, dim=-1).indices.reshape(-1)
    ends = torch.cumsum(torch.bincount(chosen, minlength=count), 0).to(torch.int32)
    results = {}
    for name, out, inp in (("experts gate_up", 2 * inter, hidden), ("experts down", hidden, inter)):
        weight = torch.randn(count, out, inp, device="cuda", dtype=torch.bfloat16) * inp**-0.5
        x = torch.randn(pairs, inp, device="cuda", dtype=torch.bfloat16)
        values, scale = float8.quantize_weight(weight)

        def bf16(x: torch.Tensor = x, weight: torch.Tensor = weight) -> torch.Tensor:
            return torch._grouped_mm(x, weight.transpose(-2, -1), offs=ends)

        def fp8(
            x: torch.Tensor = x, values: torch.Tensor = values, scale: torch.Tensor = scale
        ) -> torch.Tensor:
            q, rows = float8.quantize_rows(x)
            return torch._scaled_grouped_mm(
                q, values.transpose(-2, -1), rows.view(-1), scale, offs=ends, out_dtype=torch.bfloat16
            )

        results[name] = {
            "bf16_ms": graph_ms(bf16),
            "fp8_ms": graph_ms(fp8),
            "error": relative_error(fp8(), bf16()),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    print("float8 GEMMs agree at start-up:", float8.works(torch.device("cuda"), torch.bfloat16))
    report: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for model, layers in LAYERS.items():
        for rows in ROWS:
            table = {name: linear(out, inp, rows) for name, out, inp in layers}
            if model in EXPERTS:
                table.update(experts(*EXPERTS[model], rows))
            bf16 = sum(r["bf16_ms"] for r in table.values())
            fp8 = sum(r["fp8_ms"] for r in table.values())
            print(
                f"\n{model}, {rows} rows: a decoder layer's GEMMs {bf16:.3f} ms bf16, {fp8:.3f} ms fp8",
                end="",
            )
            print(f" ({bf16 / fp8:.2f}x)")
            for name, r in table.items():
                print(
                    f"  {name:16s} bf16 {r['bf16_ms'] * 1e3:8.1f} us  fp8 {r['fp8_ms'] * 1e3:8.1f} us"
                    f"  {r['bf16_ms'] / r['fp8_ms']:5.2f}x  error {r['error']:.4f}"
                )
            report[f"{model}/{rows}"] = {"layers": table, "bf16_ms": bf16, "fp8_ms": fp8}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
