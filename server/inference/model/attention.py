"""Decode attention over the paged KV cache: one new query token per row.

Two implementations of one function:
- `paged_attention_reference`: plain torch, row by row, each row attending over exactly
  its own length (CPU, tests, and the check for the kernel);
- `paged_attention_triton`: a Triton kernel (CUDA) with one program per (row, kv head)
  that walks the row's page table up to its length with an online softmax. Lengths
  are read on the device, so the launch is CUDA-graph safe and its cost follows each
  row's real length.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .agreement import relative_error
from .kvcache import PAGE, raw, widened


def paged_attention_reference(
    query: torch.Tensor,  # (rows, heads, dim)
    keys: torch.Tensor,  # (pages, PAGE, kv_heads, dim)
    values: torch.Tensor,
    page_table: torch.Tensor,  # (rows, max_pages) int32/int64
    lengths: list[int],
    scale: float,
) -> torch.Tensor:
    _, heads, dim = query.shape
    kv_heads = keys.shape[2]
    out = torch.empty_like(query)
    for row, length in enumerate(lengths):
        pages = page_table[row, : -(-length // PAGE)].long()
        k = widened(raw(keys)[pages], keys.dtype, query.dtype).reshape(-1, kv_heads, dim)[:length]
        v = widened(raw(values)[pages], values.dtype, query.dtype).reshape(-1, kv_heads, dim)[:length]
        k, v = k.transpose(0, 1), v.transpose(0, 1)  # (kv_heads, len, dim)
        groups = heads // kv_heads
        k = k.repeat_interleave(groups, dim=0).unsqueeze(0)
        v = v.repeat_interleave(groups, dim=0).unsqueeze(0)
        q = query[row].unsqueeze(0).unsqueeze(2)  # (1, heads, 1, dim)
        out[row] = F.scaled_dot_product_attention(q, k, v, scale=scale).squeeze(0).squeeze(1)
    return out


_KERNEL: Any = None


def _build_kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(  # type: ignore[no-untyped-def]
        Q,
        K,
        V,
        TABLE,
        LENS,
        Out,
        scale,
        stride_qr,
        stride_qh,
        stride_kp,
        stride_kt,
        stride_kh,
        stride_tr,
        stride_or,
        stride_oh,
        GROUPS: tl.constexpr,
        GROUPS_PAD: tl.constexpr,
        DIM: tl.constexpr,
        PAGE_SIZE: tl.constexpr,
    ) -> None:
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        length = tl.load(LENS + row)
        g = tl.arange(0, GROUPS_PAD)
        d = tl.arange(0, DIM)
        t = tl.arange(0, PAGE_SIZE)
        head = kv_head * GROUPS + g
        q_mask = g < GROUPS
        q = tl.load(
            Q + row * stride_qr + head[:, None] * stride_qh + d[None, :], mask=q_mask[:, None], other=0.0
        )
        m = tl.full([GROUPS_PAD], float("-inf"), tl.float32)
        s_sum = tl.zeros([GROUPS_PAD], tl.float32)
        acc = tl.zeros([GROUPS_PAD, DIM], tl.float32)
        pages = tl.cdiv(length, PAGE_SIZE)
        for p in range(pages):
            page = tl.load(TABLE + row * stride_tr + p).to(tl.int64)
            offs = page * stride_kp + t[:, None] * stride_kt + kv_head * stride_kh + d[None, :]
            valid = (p * PAGE_SIZE + t) < length
            k = tl.load(K + offs, mask=valid[:, None], other=0.0).to(q.dtype)  # float8 pools widen
            v = tl.load(V + offs, mask=valid[:, None], other=0.0).to(q.dtype)
            scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scale  # (GROUPS_PAD, PAGE)
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            alpha = tl.exp(m - m_new)
            probs = tl.exp(scores - m_new[:, None])
            s_sum = s_sum * alpha + tl.sum(probs, 1)
            acc = acc * alpha[:, None] + tl.dot(probs.to(v.dtype), v).to(tl.float32)
            m = m_new
        out = acc / s_sum[:, None]
        tl.store(
            Out + row * stride_or + head[:, None] * stride_oh + d[None, :],
            out.to(Out.dtype.element_ty),
            mask=q_mask[:, None],
        )

    return kernel


def paged_attention_triton(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    page_table: torch.Tensor,  # (rows, max_pages) int32
    lengths: torch.Tensor,  # (rows,) int32 on the device
    scale: float,
) -> torch.Tensor:
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build_kernel()
    rows, heads, dim = query.shape
    kv_heads = keys.shape[2]
    groups = heads // kv_heads
    out = torch.empty_like(query)
    _KERNEL[(rows, kv_heads)](
        query,
        keys,
        values,
        page_table,
        lengths,
        out,
        scale,
        query.stride(0),
        query.stride(1),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        page_table.stride(0),
        out.stride(0),
        out.stride(1),
        GROUPS=groups,
        GROUPS_PAD=max(16, groups),
        DIM=dim,
        PAGE_SIZE=PAGE,
        num_warps=4,
    )
    return out


def float8_cache_agrees(
    heads: int, kv_heads: int, dim: int, dtype: torch.dtype, device: torch.device
) -> bool:
    """On CUDA, whether the kernels that write and read a float8 KV cache (kvcache.py) work on
    *device*: the fused q/k kernel's float8 keys and values equal its *dtype* ones as
    `kvcache.stored` rounds them, and the decode attention over float8 pools matches the
    reference over the same pools. A device or Triton without float8 fails here (or raises), and
    the engine keeps a cache of the model's dtype instead of answering with garbage."""
    from .kernels import qk_norm_rope_store
    from .kvcache import FP8, stored

    generator = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device, dtype)

    rows = 3
    qkv, cos, sin = rand(rows, (heads + 2 * kv_heads) * dim), rand(rows, dim), rand(rows, dim)
    weight = rand(dim)
    slots = torch.tensor([5, PAGE + 7, 2 * PAGE + 1], device=device)
    pools = {}
    for pool_dtype in (dtype, FP8):
        keys = torch.zeros(3, PAGE, kv_heads, dim, dtype=pool_dtype, device=device)
        values = torch.zeros_like(keys)
        qk_norm_rope_store(qkv, weight, weight, cos, sin, keys, values, slots, heads, kv_heads, dim, 1e-6)
        pools[pool_dtype] = (keys, values)
    (wide_k, wide_v), (keys, values) = pools[dtype], pools[FP8]
    for got, wide in ((keys, wide_k), (values, wide_v)):
        if not torch.equal(got.view(torch.uint8), stored(wide, FP8).view(torch.uint8)):
            return False
    query = rand(2, heads, dim)
    table = torch.tensor([[0, 1, 2], [2, 0, 1]], device=device)
    lengths = [3 * PAGE - 10, PAGE + 20]
    expected = paged_attention_reference(query, keys, values, table, lengths, dim**-0.5)
    got = paged_attention_triton(query, keys, values, table, torch.tensor(lengths, device=device), dim**-0.5)
    return relative_error(got, expected) < 0.05
