"""The experts of a mixture of experts over float8 weights: W8A16 (the model's activations), or W8A8.

Why: at a decode step the experts' GEMMs are many skinny ones (30B-A3B at 64 rows: 512
(token, expert) pairs over 128 experts, a few rows each), bound by reading the weights, and
float8 weights are half of bf16's bytes. torch's float8 grouped GEMM (`_scaled_grouped_mm`)
needs float8 activations too and took longer than bf16's at a prefill's size on an H200 (its
CUDA graphs also disagreed with its eager runs). Here the weights are widened to the
activations' dtype in registers as they stream in, multiplied on the tensor cores with float32
accumulation, and each output channel's scale is applied once at the end, as vLLM's
"fp8_w8a16" fused-MoE kernel does.

How: the pairs are sorted by expert on the device (a sort and a search, no host sync), so a
launch is the same at every step and CUDA graphs capture it. Each program takes one block of
BLOCK_M pairs of one expert (an expert with many pairs gets several programs, as routing
with random weights concentrates tokens on few experts) and one block of output channels.
gate/up and SiLU * up are one launch (GATED), the down projection and the routing weight
another (ROUTED); the pairs' outputs are then summed per token. With `float8_activations` the
inputs are float8 too, a scale per row (W8A8), for float8 tensor cores at a prefill's rows
(bench/float8_experts.py measures it and ranks it against bf16 and W8A16 for the engine:
`prefill_modes`).

Tiles (pairs, channels and inputs a program takes at a time, warps, pipeline stages) come from
`float8_tiles.json` where it has the GPU and the shape: the fastest of a sweep on that GPU
(`bench/float8_experts.py --write-tiles`, as vLLM keeps measured configs for its kernel), else a rule.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

TILES_FILE = Path(__file__).with_name("float8_tiles.json")


class Tiles(NamedTuple):
    """A launch's shape: pairs, output channels and inputs per step of a program; warps; stages."""

    m: int
    n: int
    k: int
    warps: int = 4
    stages: int = 3


@triton.jit
def _experts_kernel(  # type: ignore[no-untyped-def]
    X, X_SCALE, W, SCALE, OUT, ORDER, STARTS, ROUTE,
    stride_x, stride_we, stride_wn, stride_se, stride_out, N, K, IN_DIV, EXPERTS,
    FLOAT8_X: tl.constexpr, GATED: tl.constexpr, ROUTED: tl.constexpr, EXPERTS_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IMPRECISE: tl.constexpr,
):  # fmt: skip
    """Program (block b of pairs, block of N): the experts' pairs are ORDER[STARTS[e]:STARTS[e+1]],
    cut into blocks of BLOCK_M, numbered expert after expert; for each pair p of block b, of
    expert e, OUT[p] = X[p // IN_DIV] @ (W[e] * SCALE[e]).T over this block of channels. GATED:
    W[e] holds [gate | up] (2N rows) and OUT[p] = SiLU(gate) * up. ROUTED: times ROUTE[p].
    FLOAT8_X: X is float8 too, each row r scaled by X_SCALE[r] (W8A8: float8 tensor cores), the
    products summed in float32 every IMPRECISE inputs (Hopper's float8 tensor cores keep fewer
    bits while they accumulate; Triton's default there, None, never sums in float32)."""
    block = tl.program_id(0)
    experts = tl.arange(0, EXPERTS_POW2)
    known = experts < EXPERTS
    starts = tl.load(STARTS + experts, mask=known, other=0)
    blocks = (tl.load(STARTS + experts + 1, mask=known, other=0) - starts + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(blocks, axis=0)  # of each expert's blocks, in block numbers
    expert = tl.sum((ends <= block).to(tl.int32), axis=0)  # whose blocks hold block b
    if expert < EXPERTS:
        mine = experts == expert
        first = tl.sum(tl.where(mine, starts + (block - ends + blocks) * BLOCK_M, 0), axis=0)
        end = tl.load(STARTS + expert + 1)
        offs_m = first + tl.arange(0, BLOCK_M)
        inside = offs_m < end
        pair = tl.load(ORDER + offs_m, mask=inside, other=0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        x = X + (pair // IN_DIV)[:, None] * stride_x + offs_k[None, :]
        w = W + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            a = tl.load(x + k, mask=inside[:, None], other=0.0)
            b = tl.load(w + k)
            if not FLOAT8_X:
                b = b.to(a.dtype)
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=IMPRECISE)
            if GATED:
                b = tl.load(w + N * stride_wn + k)
                if not FLOAT8_X:
                    b = b.to(a.dtype)
                acc_up = tl.dot(a, b, acc_up, max_num_imprecise_acc=IMPRECISE)
        if FLOAT8_X:
            row_scale = tl.load(X_SCALE + pair // IN_DIV, mask=inside, other=0.0)[:, None]
            acc = acc * row_scale
            acc_up = acc_up * row_scale
        acc = acc * tl.load(SCALE + expert * stride_se + offs_n)[None, :]
        if GATED:
            up = acc_up * tl.load(SCALE + expert * stride_se + N + offs_n)[None, :]
            acc = acc / (1.0 + tl.exp(-acc)) * up
        if ROUTED:
            acc = acc * tl.load(ROUTE + pair, mask=inside, other=0.0).to(tl.float32)[:, None]
        out = OUT + pair[:, None] * stride_out + offs_n[None, :]
        tl.store(out, acc.to(OUT.dtype.element_ty), mask=inside[:, None])


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    out: torch.Tensor,
    tiles: Tiles,
    order: torch.Tensor,
    starts: torch.Tensor,
    *,
    x_scale: torch.Tensor | None = None,
    route: torch.Tensor | None = None,
    in_div: int = 1,
    gated: bool = False,
    imprecise: bool = False,
) -> None:
    experts, n, k = weight.shape[0], out.shape[1], weight.shape[2]
    if n % tiles.n or k % tiles.k or x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError(f"float8 experts: {n} outputs, {k} inputs do not tile by {tiles}")
    blocks = triton.cdiv(order.shape[0], tiles.m) + experts  # each expert's last block may be partial
    _experts_kernel[(blocks, n // tiles.n)](
        x, out if x_scale is None else x_scale, weight, scale, out, order, starts,
        out if route is None else route,
        x.stride(0), weight.stride(0), weight.stride(1), scale.stride(0), out.stride(0),
        n, k, in_div, experts,
        FLOAT8_X=x_scale is not None, GATED=gated, ROUTED=route is not None,
        EXPERTS_POW2=triton.next_power_of_2(experts),
        BLOCK_M=tiles.m, BLOCK_N=tiles.n, BLOCK_K=tiles.k, num_warps=tiles.warps, num_stages=tiles.stages,
        IMPRECISE=None if x_scale is None or imprecise else tiles.k,  # None: Triton's default
    )  # fmt: skip


@functools.cache
def _measured(device: str) -> dict[str, list[Any]]:
    try:
        table: dict[str, dict[str, list[Any]]] = json.loads(TILES_FILE.read_text())
    except FileNotFoundError:
        return {}
    return table.get(device, {})


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def prefill_key(hidden: int, inter: int) -> str:
    """The key of `float8_tiles.json` under which the ways of taking a prefill's rows (bf16
    experts, W8A16, W8A8: `float8.PREFILL_MODES`) are ranked, fastest first, for these experts."""
    return f"prefill {hidden}x{inter}"


def prefill_modes(device: torch.device, hidden: int, inter: int) -> list[str]:
    """The ways experts of *hidden* x *inter* take a prefill's rows on *device*, fastest first,
    as bench/float8_experts.py measured them; empty where it has not."""
    return [str(mode) for mode in _measured(_device_name(device)).get(prefill_key(hidden, inter), [])]


def _rows_class(rows: int) -> int:
    """16, 32 or 64: a class of pairs an expert holds on average (a decode step's or a prefill's)."""
    return min(64, max(16, triton.next_power_of_2(rows)))


def _divisor(size: int, most: int) -> int:
    """The largest power of two up to *most* that divides *size* (16 at least: Triton's dot)."""
    tile = most
    while tile > 16 and size % tile:
        tile //= 2
    return tile


def tile_key(kind: str, n: int, k: int, per_expert: int) -> str:
    """The key of `float8_tiles.json` for a launch: kernel ("gated" or "routed", "... fp8" with
    float8 activations), outputs, inputs, and the class of pairs an expert holds on average."""
    return f"{kind} {n}x{k} m{_rows_class(per_expert)}"


def _tiles(kind: str, n: int, k: int, per_expert: int, device: torch.device) -> Tiles:
    found = _measured(_device_name(device)).get(tile_key(kind, n, k, per_expert))
    return Tiles(*found) if found else Tiles(_rows_class(per_expert), _divisor(n, 64), _divisor(k, 128))


def experts(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_scale: torch.Tensor,
    down: torch.Tensor,
    down_scale: torch.Tensor,
    bounds: torch.Tensor,
    tiles: tuple[Tiles, Tiles] | None = None,
    float8_activations: bool = False,
    imprecise: bool = False,
) -> torch.Tensor:
    """A mixture of experts over x (tokens, hidden): each token through its top_k experts
    (SiLU(x @ gate.T) * (x @ up.T)) @ down.T, summed with its routing weights. *gate_up*
    (experts, 2 * inter, hidden) and *down* (experts, hidden, inter) are float8 with float32 scales
    per output channel (experts, channels); *bounds* is arange(experts + 1) on the device.
    *float8_activations*: each GEMM's input rows rounded to float8 too, with a scale each
    (`float8.quantize_rows`), for float8 tensor cores (W8A8: for a prefill's many rows, where
    W8A16 is bound by the tensor cores' bf16 rate; bench/float8_experts.py measures both), their
    products summed in float32 every block of inputs, unless *imprecise* (Hopper's float8 tensor
    cores' own accumulation throughout, as Triton's default: faster, ~2% off)."""
    tokens, chosen = top_k_index.shape
    inter = down.shape[2]
    expert_of_pair, order = torch.sort(top_k_index.reshape(-1))
    starts = torch.searchsorted(expert_of_pair, bounds)
    if tiles is None:
        per_expert = tokens * chosen // gate_up.shape[0]
        kinds = ("gated fp8", "routed fp8") if float8_activations else ("gated", "routed")
        tiles = (
            _tiles(kinds[0], inter, x.shape[1], per_expert, x.device),
            _tiles(kinds[1], x.shape[1], inter, per_expert, x.device),
        )
    pairs = torch.empty((tokens * chosen, inter), dtype=x.dtype, device=x.device)
    a, a_scale = _rows(x, float8_activations)
    _launch(
        a, gate_up, gate_up_scale, pairs, tiles[0], order, starts,
        x_scale=a_scale, in_div=chosen, gated=True, imprecise=imprecise,
    )  # fmt: skip
    out = torch.empty((tokens * chosen, x.shape[1]), dtype=x.dtype, device=x.device)
    a, a_scale = _rows(pairs, float8_activations)
    _launch(
        a, down, down_scale, out, tiles[1], order, starts,
        x_scale=a_scale, route=top_k_weights.reshape(-1), imprecise=imprecise,
    )  # fmt: skip
    return out.view(tokens, chosen, -1).sum(dim=1)


def _rows(x: torch.Tensor, float8: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A GEMM's input: *x*, or its rows in float8 and their scales."""
    if not float8:
        return x, None
    from .float8 import quantize_rows

    q, scale = quantize_rows(x)
    return q, scale.view(-1)
