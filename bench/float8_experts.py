"""float8 experts (server/inference/model/float8_gemm.py) against bf16, on one GPU.

The experts of 30B-A3B (8 of 128 a token) at 64 rows (a decode step at c=64) and 4096 rows (a
prefill slice of ~4 pictures), routed two ways: uniformly at random (as a trained router
spreads tokens), and skewed (every token prefers the same few experts, as the random-weight
checkpoints' routers do: the engine's 30B-A3B decode step took 10.9 ms in bf16 where uniform
routing needs ~24). For each: transformers' experts module (`grouped_mm`, bf16) against
`float8.Float8Experts` (two launches of the W8A16 kernel) with the engine's tiles and with the
best of a sweep, with bf16 activations (W8A16, what the engine runs at a decode step's rows)
and with float8 activations (W8A8, float8 tensor cores: at a prefill's rows only); the kernel's
error against the same product in float32 (what is left is bf16's rounding of its outputs,
~1e-3 of their largest) and against bf16 (float8's own rounding, ~5%; more with float8
activations). Device time of one call inside a CUDA graph (bench/float8_gemms.py).

python bench/float8_experts.py [--out float8_experts.json] [--write-tiles] [--rows 64,4096] [--profile]

--write-tiles keeps each shape's fastest tiles for this GPU in float8_tiles.json, which the
engine reads (float8_gemm.py): those of the skewed routing, which the benchmarks serve; and
the three ways ranked at a prefill's rows, which decides how the engine's experts take a
prefill (`float8.prefill_mode`).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from typing import Any

import torch

from bench.float8_gemms import EXPERTS, graph_ms
from server.inference.model import float8, float8_gemm
from server.inference.model.agreement import relative_error
from server.inference.model.float8_gemm import Tiles

DEVICE = "cuda"  # --device cpu: a dry run of this script through Triton's interpreter, untimed
PROFILE = False  # --profile: each shape's kernels, one by one (the engine's tiles)
TILES = {
    64: [  # a decode step: ~4 pairs an expert (uniform)
        Tiles(m, n, k, warps, stages)
        for m, n, k, (warps, stages) in itertools.product(
            (16, 32), (32, 64, 128), (128, 256), ((2, 4), (4, 3), (4, 4), (8, 4))
        )
    ],
    4096: [  # a prefill slice: ~256 pairs an expert (uniform)
        Tiles(m, n, k, warps, stages)
        for m, n, k, (warps, stages) in itertools.product(
            (64, 128), (64, 128), (64, 128), ((4, 3), (8, 3), (8, 4))
        )
    ],
}

MODES = {64: (("w8a16", False),), 4096: (("w8a16", False), ("w8a8", True))}  # the engine's at these rows


def timed(fn: Any) -> float:
    if DEVICE != "cuda":
        fn()
        return 1.0
    try:
        return graph_ms(fn)
    except Exception as exc:  # a tile the compiler refuses (shared memory): skipped, said why
        print(f"    skipped: {type(exc).__name__}: {str(exc)[:100]}")
        return float("inf")


def routing(rows: int, count: int, per_token: int, skewed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device=DEVICE).manual_seed(rows)
    logits = torch.randn(rows, count, device=DEVICE, generator=generator)
    if skewed:  # one preference for all tokens, as a random router's over similar hidden states
        logits += 4 * torch.randn(count, device=DEVICE, generator=generator)
    weights, index = torch.softmax(logits, -1).topk(per_token, dim=-1)
    return (weights / weights.sum(-1, keepdim=True)).to(torch.bfloat16), index


def experts(count: int, per_token: int, hidden: int, inter: int, rows: int, skewed: bool) -> dict[str, Any]:
    from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextExperts

    config = Qwen3VLMoeTextConfig(
        hidden_size=hidden, moe_intermediate_size=inter, num_experts=count, num_experts_per_tok=per_token
    )
    config._experts_implementation = "grouped_mm"
    with torch.device(DEVICE):
        stock = Qwen3VLMoeTextExperts(config).to(torch.bfloat16)
    with torch.no_grad():
        stock.gate_up_proj.normal_(0, hidden**-0.5)
        stock.down_proj.normal_(0, inter**-0.5)
    fp8 = float8.Float8Experts(stock)
    x = torch.randn(rows, hidden, device=DEVICE, dtype=torch.bfloat16)
    weights, index = routing(rows, count, per_token, skewed)
    args = (fp8.gate_up, fp8.gate_up_scale, fp8.down, fp8.down_scale, fp8.bounds)
    per_expert = rows * per_token // count
    result: dict[str, Any] = {
        "experts_touched": int(index.unique().numel()),
        "most_pairs_an_expert": int(index.reshape(-1).bincount().max()),
    }
    with torch.no_grad():
        result["bf16_ms"] = timed(lambda: stock(x, index, weights))
        bf16 = stock(x, index, weights)
        for mode, a8 in MODES[rows]:
            got = float8_gemm.experts(x, index, weights, *args, float8_activations=a8)
            reference = fp8._reference(x[:256], index[:256], weights[:256], a8)
            best: tuple[float, Tiles | None] = (float("inf"), None)
            for tiles in TILES[rows]:
                ms = timed(
                    lambda t=tiles, a8=a8: float8_gemm.experts(
                        x, index, weights, *args, tiles=(t, t), float8_activations=a8
                    )
                )
                best = min(best, (ms, tiles), key=lambda b: b[0])
            suffix = " fp8" if a8 else ""
            if a8 and best[1]:  # Hopper's float8 accumulation throughout: how much the sums in float32 cost
                imprecise = functools.partial(
                    float8_gemm.experts, x, index, weights, *args,
                    tiles=(best[1], best[1]), float8_activations=True, imprecise=True,
                )  # fmt: skip
                result["w8a8 imprecise"] = {
                    "best_ms": timed(imprecise),
                    "error_vs_reference": relative_error(imprecise()[:256], reference),
                }
            result[mode] = {
                "error_vs_reference": relative_error(got[:256], reference),
                "error_vs_bf16": relative_error(got, bf16),
                "ms": timed(
                    lambda a8=a8: float8_gemm.experts(x, index, weights, *args, float8_activations=a8)
                ),
                "best_ms": best[0],
                "best_tiles": best[1],
                "keys": [
                    float8_gemm.tile_key("gated" + suffix, inter, hidden, per_expert),
                    float8_gemm.tile_key("routed" + suffix, hidden, inter, per_expert),
                ],
            }
        if PROFILE:
            a8 = rows > float8.DECODE_ROWS  # the engine's way at these rows where W8A8 ranks first
            print(kernel_times(lambda: float8_gemm.experts(x, index, weights, *args, float8_activations=a8)))
    return result


def kernel_times(fn: Any, calls: int = 20) -> str:
    """Where one call's device time goes, kernel by kernel (torch's profiler over *calls* calls)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = sorted(
        ((e.key, e.device_time_total / calls, e.count // calls) for e in profile.key_averages()),
        key=lambda row: -row[1],
    )
    return "\n".join(f"    {us:7.1f} us  x{n}  {name[:90]}" for name, us, n in rows if us >= 0.5)


def write_tiles(report: dict[str, Any], device: str) -> None:
    """Into float8_gemm.TILES_FILE under *device*: the fastest tiles of each shape with the skewed
    routing (which the benchmarks serve) where they beat the engine's rule (the tiles it ran as
    "ms") by more than 3%; and per model, bf16, W8A16 and W8A8 ranked by their time at a
    prefill's rows (best tiles, both routings summed), which `float8.prefill_mode` follows."""
    path = float8_gemm.TILES_FILE
    table = json.loads(path.read_text()) if path.exists() else {}
    found = table.setdefault(device, {})
    for key, result in report.items():
        if not key.endswith("skewed"):
            continue
        for mode, _ in MODES[int(key.split("/")[1])]:
            m = result[mode]
            if m["best_tiles"] and m["best_ms"] < 0.97 * m["ms"]:
                for tile_key in m["keys"]:
                    found[tile_key] = list(m["best_tiles"])
    for model, (_, _, hidden, inter) in EXPERTS.items():
        prefills = [report[f"{model}/4096/{routing}"] for routing in ("uniform", "skewed")]
        times = {mode: sum(r[mode]["best_ms"] for r in prefills) for mode in ("w8a16", "w8a8")}
        times["bf16"] = sum(r["bf16_ms"] for r in prefills)
        found[float8_gemm.prefill_key(hidden, inter)] = sorted(times, key=times.__getitem__)
        print(f"{model} prefill, fastest first: {found[float8_gemm.prefill_key(hidden, inter)]}")
    table[device] = dict(sorted(found.items()))
    devices = [
        f"  {json.dumps(name)}: {{\n"
        + ",\n".join(f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in keys.items())
        for name, keys in table.items()
    ]
    path.write_text("{\n" + "\n  },\n".join(devices) + "\n  }\n}\n")  # a shape's tiles on one line
    print(f"tiles for {device}: {len(table[device])} entries in {path}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--write-tiles", action="store_true", help="the fastest tiles into float8_tiles.json")
    parser.add_argument("--profile", action="store_true", help="each shape's device time by kernel")
    parser.add_argument(
        "--rows", default="64,4096", help="comma list of 64 and/or 4096 (a decode step, a prefill)"
    )
    args = parser.parse_args()
    global DEVICE, PROFILE
    DEVICE, PROFILE = args.device, args.profile and args.device == "cuda"
    started = time.monotonic()
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    print(device, "torch", torch.__version__)
    report: dict[str, Any] = {"device": device, "torch": torch.__version__}
    for model, shape in EXPERTS.items():
        for rows, skewed in itertools.product(map(int, args.rows.split(",")), (False, True)):
            r = experts(*shape, rows, skewed)
            report[f"{model}/{rows}/{'skewed' if skewed else 'uniform'}"] = r
            print(
                f"{model} experts, {rows} rows, {'skewed' if skewed else 'uniform'} routing"
                f" ({r['experts_touched']} experts, at most {r['most_pairs_an_expert']} pairs):"
                f" bf16 {r['bf16_ms'] * 1e3:.1f} us",
                flush=True,
            )
            for mode, _ in MODES[rows]:
                m = r[mode]
                best = tuple(m["best_tiles"] or ())
                print(
                    f"  {mode}: {m['ms'] * 1e3:.1f} us ({r['bf16_ms'] / m['ms']:.2f}x), best"
                    f" {m['best_ms'] * 1e3:.1f} us ({r['bf16_ms'] / m['best_ms']:.2f}x) {best};"
                    f" error {m['error_vs_reference']:.4f} (reference) {m['error_vs_bf16']:.4f} (bf16)",
                    flush=True,
                )
            if "w8a8 imprecise" in r:
                m = r["w8a8 imprecise"]
                print(
                    f"  w8a8 without float32 sums: {m['best_ms'] * 1e3:.1f} us"
                    f" ({r['bf16_ms'] / m['best_ms']:.2f}x); error {m['error_vs_reference']:.4f} (reference)",
                    flush=True,
                )
    print(f"{time.monotonic() - started:.0f} s")
    if args.write_tiles:
        write_tiles({key: r for key, r in report.items() if "/" in key}, device)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
