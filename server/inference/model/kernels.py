"""Fused Triton kernels for the CUDA decode step (and the norms/MLP of prefill, the vision LayerNorms).

A stock decoder layer launches ~55 small kernels per token step (each RMSNorm is seven
elementwise passes, rotary another ten); at small batch the step is bound by launches,
not by the GPU. These kernels fold each chain into one launch, with the same rounding
points as transformers (results are rounded to the model dtype where the stock code
rounds), so a layer becomes ~9 launches:

    add+RMSNorm | qkv GEMM | q/k RMSNorm + rotary + KV-cache write | paged attention |
    o GEMM | add+RMSNorm | gate_up GEMM | SiLU*up | down GEMM

`fuse_projections` concatenates q/k/v and gate/up weights in place (the old parameters
become views of the fused ones: no extra memory). Only used on CUDA; the CPU path keeps
the stock modules.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_kernel(  # type: ignore[no-untyped-def]
    X, RES, W, B, Y, SUM, stride_x, stride_r, stride_y, N, eps,
    HAS_RES: tl.constexpr, LAYER: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """A row of X (or of X + RES, stored to SUM) normalised: RMSNorm as Qwen3's (rounded to the
    output dtype before the weight), or with LAYER a LayerNorm as torch's (float32, one rounding)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(RES + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(Y.dtype.element_ty)  # the residual add rounds like the stock `a + b`
        tl.store(SUM + row * stride_y + offs, s, mask=mask)
        x = s.to(tl.float32)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    if LAYER:
        mean = tl.sum(x, axis=0) / N
        centered = tl.where(mask, x - mean, 0.0)
        var = tl.sum(centered * centered, axis=0) / N
        b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
        y = centered * tl.rsqrt(var + eps) * w + b
    else:
        var = tl.sum(x * x, axis=0) / N
        y = w * (x * tl.rsqrt(var + eps)).to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + offs, y.to(Y.dtype.element_ty), mask=mask)


def _norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
) -> Any:
    n = x.shape[-1]
    rows = x.numel() // n
    x2 = x.reshape(rows, n)
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    total = torch.empty_like(out) if residual is not None else out
    r2 = residual.reshape(rows, n) if residual is not None else x2
    _norm_kernel[(rows,)](
        x2,
        r2,
        weight,
        bias if bias is not None else weight,
        out,
        total,
        x2.stride(0),
        r2.stride(0),
        n,
        n,
        eps,
        HAS_RES=residual is not None,
        LAYER=bias is not None,
        BLOCK=triton.next_power_of_2(n),
        num_warps=4 if n <= 1024 else 8,
    )
    if residual is None:
        return out.view(x.shape)
    return out.view(x.shape), total.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> Any:
    """RMSNorm over the last dim; with *residual*: returns (norm(x + residual), x + residual)."""
    return _norm(x, weight, None, eps, residual)


def layer_norm(norm: Any, x: torch.Tensor, residual: torch.Tensor | None = None) -> Any:
    """`norm(x)` for a `torch.nn.LayerNorm` *norm* (with a bias) over the last dim; with *residual*:
    (norm(x + residual), x + residual)."""
    return _norm(
        x.contiguous(), norm.weight, norm.bias, norm.eps, None if residual is None else residual.contiguous()
    )


@triton.jit
def _float8(x, POOL):  # type: ignore[no-untyped-def]
    """*x* as a float8 pool keeps it: clamped to +-448 (kvcache.FP8_MAX), then rounded."""
    return tl.minimum(tl.maximum(x.to(tl.float32), -448.0), 448.0).to(POOL.dtype.element_ty)


@triton.jit
def _qk_norm_rope_kernel(  # type: ignore[no-untyped-def]
    QKV,
    QW,
    KW,
    COS,
    SIN,
    QOUT,
    KCACHE,
    VCACHE,
    SLOTS,
    stride_qkv,
    stride_cs,
    eps,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    DIM: tl.constexpr,
    QK_PAD: tl.constexpr,
    KV_PAD: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    """One token's q and k heads (rows of a [QK_PAD, DIM / 2] block per half) and its v heads;
    into a float8 cache (KV_FP8) clamped to +-448 first, as `kvcache.stored`."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.arange(0, QK_PAD)[:, None]  # the q heads, then the k heads
    half = tl.arange(0, DIM // 2)[None, :]
    live = (head < HEADS + KV_HEADS) & (half < DIM // 2)
    is_q = (head < HEADS) & live
    is_k = (head >= HEADS) & live
    base = QKV + row * stride_qkv + head * DIM
    x1 = tl.load(base + half, mask=live, other=0.0).to(tl.float32)
    x2 = tl.load(base + DIM // 2 + half, mask=live, other=0.0).to(tl.float32)
    var = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1))[:, None] / DIM
    inv = tl.rsqrt(var + eps)
    dtype = QOUT.dtype.element_ty
    w1 = tl.where(is_q, tl.load(QW + half).to(tl.float32), tl.load(KW + half).to(tl.float32))
    w2 = tl.where(
        is_q, tl.load(QW + DIM // 2 + half).to(tl.float32), tl.load(KW + DIM // 2 + half).to(tl.float32)
    )
    n1 = (w1 * (x1 * inv).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    n2 = (w2 * (x2 * inv).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    c1 = tl.load(COS + row * stride_cs + half).to(tl.float32)
    c2 = tl.load(COS + row * stride_cs + DIM // 2 + half).to(tl.float32)
    s1 = tl.load(SIN + row * stride_cs + half).to(tl.float32)
    s2 = tl.load(SIN + row * stride_cs + DIM // 2 + half).to(tl.float32)
    o1 = (n1 * c1 - n2 * s1).to(dtype)  # rotate_half: (-x2, x1)
    o2 = (n2 * c2 + n1 * s2).to(dtype)
    out = QOUT + (row * HEADS + head) * DIM
    tl.store(out + half, o1, mask=is_q)
    tl.store(out + DIM // 2 + half, o2, mask=is_q)
    slot = tl.load(SLOTS + row).to(tl.int64)
    kout = KCACHE + (slot * KV_HEADS + head - HEADS) * DIM
    kv = tl.arange(0, KV_PAD)[:, None]
    dim = tl.arange(0, DIM)[None, :]
    values = (kv < KV_HEADS) & (dim < DIM)
    v = tl.load(QKV + row * stride_qkv + (HEADS + KV_HEADS + kv) * DIM + dim, mask=values)
    if KV_FP8:
        o1, o2, v = _float8(o1, KCACHE), _float8(o2, KCACHE), _float8(v, KCACHE)
    tl.store(kout + half, o1, mask=is_k)
    tl.store(kout + DIM // 2 + half, o2, mask=is_k)
    tl.store(VCACHE + (slot * KV_HEADS + kv) * DIM + dim, v, mask=values)


def qk_norm_rope_store(
    qkv: torch.Tensor,  # (rows, (heads + 2 * kv_heads) * dim)
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,  # (rows, dim)
    sin: torch.Tensor,
    keys: torch.Tensor,  # (pages, PAGE, kv_heads, dim)
    values: torch.Tensor,
    slots: torch.Tensor,  # (rows,)
    heads: int,
    kv_heads: int,
    dim: int,
    eps: float,
) -> torch.Tensor:
    """Per-head RMSNorm of q and k, rotary, k/v into the cache at *slots*; returns q (rows, heads, dim).

    One program per token, all its heads at once: a program per (token, head) of 64 values each
    took 20 us per layer for one picture's 1043 tokens on an H200 (2B, `bench/profile_prefill.py`),
    several times what its bytes need."""
    rows = qkv.shape[0]
    q = torch.empty((rows, heads, dim), dtype=qkv.dtype, device=qkv.device)
    _qk_norm_rope_kernel[(rows,)](
        qkv,
        q_weight,
        k_weight,
        cos,
        sin,
        q,
        keys,
        values,
        slots,
        qkv.stride(0),
        cos.stride(0),
        eps,
        HEADS=heads,
        KV_HEADS=kv_heads,
        DIM=dim,
        QK_PAD=triton.next_power_of_2(heads + kv_heads),
        KV_PAD=triton.next_power_of_2(kv_heads),
        KV_FP8=keys.dtype == torch.float8_e4m3fn,
        num_warps=4,
    )
    return q


@triton.jit
def _silu_mul_kernel(GU, OUT, stride_gu, stride_out, N, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    gate = tl.load(GU + row * stride_gu + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(GU + row * stride_gu + N + offs, mask=mask, other=0.0).to(tl.float32)
    dtype = OUT.dtype.element_ty
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(OUT + row * stride_out + offs, (act * up).to(dtype), mask=mask)


@triton.jit
def quantize_rows_kernel(X, Q, SCALE, stride_x, N, tiny, fp8_max, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    """A row of X as float8 values and one float32 scale (float8.quantize_rows): the row's largest
    magnitude maps to fp8_max."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), tiny) / fp8_max
    q = tl.minimum(tl.maximum(x / scale, -fp8_max), fp8_max)
    tl.store(Q + row * N + offs, q.to(Q.dtype.element_ty), mask=mask)
    tl.store(SCALE + row, scale)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for a (..., 2 * n) tensor holding [gate | up]."""
    n = gate_up.shape[-1] // 2
    flat = gate_up.reshape(-1, 2 * n)
    out = torch.empty((flat.shape[0], n), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(flat.shape[0], triton.cdiv(n, block))](
        flat, out, flat.stride(0), out.stride(0), n, BLOCK=block
    )
    return out.view(*gate_up.shape[:-1], n)


@triton.jit
def _vision_rope_kernel(  # type: ignore[no-untyped-def]
    X,
    COS,
    SIN,
    OUT,
    stride_xn,
    stride_xh,
    stride_cn,
    HEADS: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, HEADS)[:, None]
    d = tl.arange(0, HALF_PAD)[None, :]
    mask = d < HALF
    x1 = tl.load(X + n * stride_xn + h * stride_xh + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + n * stride_xn + h * stride_xh + HALF + d, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(COS + n * stride_cn + d, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + n * stride_cn + HALF + d, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + n * stride_cn + d, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + n * stride_cn + HALF + d, mask=mask, other=0.0).to(tl.float32)
    out = OUT + n * HEADS * 2 * HALF + h * 2 * HALF + d
    tl.store(out, (x1 * c1 - x2 * s1).to(OUT.dtype.element_ty), mask=mask)
    tl.store(out + HALF, (x2 * c2 + x1 * s2).to(OUT.dtype.element_ty), mask=mask)


def _vision_rope_one(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    tokens, heads, dim = x.shape
    out = torch.empty((tokens, heads, dim), dtype=x.dtype, device=x.device)
    cos, sin = cos.contiguous(), sin.contiguous()
    _vision_rope_kernel[(tokens,)](
        x,
        cos,
        sin,
        out,
        x.stride(0),
        x.stride(1),
        cos.stride(0),
        HEADS=heads,
        HALF=dim // 2,
        HALF_PAD=triton.next_power_of_2(dim // 2),
        num_warps=2,
    )
    return out


def vision_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Any:
    """transformers' `apply_rotary_pos_emb_vision` (float32 math, one rounding) in one pass each."""
    if q.shape[1] & (q.shape[1] - 1) or q.stride(-1) != 1 or k.stride(-1) != 1 or not q.is_cuda:
        return _STOCK_VISION_ROPE(q, k, cos, sin)  # head counts Triton cannot tile, or CPU tensors
    return _vision_rope_one(q, cos, sin), _vision_rope_one(k, cos, sin)


_STOCK_VISION_ROPE: Any = None


def _fuse(linears: list[Any]) -> torch.nn.Linear:
    """One bias-free linear layer over the concatenated weights of *linears*, whose weights
    become views of it (no extra memory)."""
    fused = torch.cat([linear.weight.data for linear in linears])
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight.data = fused[start : start + rows]
        start += rows
    module = torch.nn.Linear(fused.shape[1], fused.shape[0], bias=False, device="meta")
    module.weight = torch.nn.Parameter(fused, requires_grad=False)
    return module


def fuse_projections(model: Any) -> None:
    """Give each text layer a `qkv` projection (and `gate_up` for dense MLPs); patch norms and MLPs.

    After this, transformers' own forward (used by prefill) runs the fused RMSNorm, the
    fused gate/up + SiLU*up and the fused vision rotary embedding too.
    """
    text = model.model.language_model
    for layer in text.layers:
        attn = layer.self_attn
        if any(p.bias is not None for p in (attn.q_proj, attn.k_proj, attn.v_proj)):
            raise ValueError("biased q/k/v projections are not supported by the fused decode step")
        attn.qkv = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        mlp = layer.mlp
        if hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj"):
            mlp.gate_up = _fuse([mlp.gate_proj, mlp.up_proj])
            mlp.forward = _fused_mlp_forward(mlp)
    for module in text.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = _fused_norm_forward(module)
    global _STOCK_VISION_ROPE
    import importlib

    for name in ("qwen3_vl", "qwen3_vl_moe"):
        modeling = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        if getattr(modeling, "apply_rotary_pos_emb_vision", None) is not vision_rope:
            _STOCK_VISION_ROPE = _STOCK_VISION_ROPE or modeling.apply_rotary_pos_emb_vision
            setattr(modeling, "apply_rotary_pos_emb_vision", vision_rope)  # noqa: B010


def restore_stock_functions() -> None:
    """Undo the module-level patch of `fuse_projections` (benchmarks compare against stock code)."""
    import importlib

    if _STOCK_VISION_ROPE is None:
        return
    for name in ("qwen3_vl", "qwen3_vl_moe"):
        modeling = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        setattr(modeling, "apply_rotary_pos_emb_vision", _STOCK_VISION_ROPE)  # noqa: B010


def _fused_mlp_forward(mlp: Any) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return mlp.down_proj(silu_mul(mlp.gate_up(x)))

    return forward


def _fused_norm_forward(norm: Any) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x.contiguous(), norm.weight, norm.variance_epsilon)

    return forward
