"""Variable-length flash attention for the engine's packed attentions, the fastest one installed.

Two places attend over packed rows of different lengths (`cu` offsets): the vision encoder (each
picture's patches attend to each other, head dim 64 in Qwen3-VL) and the packed prefill (each row's
new tokens attend causally to its whole sequence). On CUDA, in order of preference:
- FlashAttention 4 (`flash_attn.cute`, the CuTe-DSL kernels of the `flash-attn-4` package), on
  Hopper and Blackwell: one kernel for any mix of lengths, compiled once per head size. Measured
  on an H200 (`bench/attention_kernels.py`, 2026-12-01): five 4096-patch pictures at head dim 64
  in 0.79 ms per layer, against 1.32 ms for torch's FA2 called once per picture (transformers' SDPA
  path) and 1.20 ms for torch's FA2 varlen;
  in the prefill's graphs (2B, one picture's 1043 tokens, `bench/profile_prefill.py`): 0.5 ms a
  forward against FA2's 1.9 ms and 0.4 ms of copies beside it;
- torch's variable-length FA2 (`torch.nn.attention.varlen`).
Each is checked once against row-by-row SDPA before it is used (a kernel that disagrees, or a
package of another API, is skipped with a warning), so a wrong install costs speed, not answers.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger("vlbridge.model.flash")

FA4 = "FlashAttention 4"
# attend(q (T, heads, dim), k (K, kv_heads, dim), v, cu_q, cu_k, max_q, max_k) -> (T, heads, dim)
Varlen = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int], torch.Tensor
]


def attention_by_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_starts: list[int],
    key_starts: list[int],
    scale: float,
    causal: bool = True,
) -> torch.Tensor:
    """Each row's queries attend to its keys with SDPA; causal: bottom-right aligned (a row's last
    query sees every key of its row, as when new tokens follow a reused prefix)."""
    outs = []
    for row in range(len(query_starts) - 1):
        qs = q[query_starts[row] : query_starts[row + 1]].transpose(0, 1)  # (heads, m, dim)
        ks = k[key_starts[row] : key_starts[row + 1]].transpose(0, 1)  # (kv_heads, n, dim)
        vs = v[key_starts[row] : key_starts[row + 1]].transpose(0, 1)
        m, n = qs.shape[1], ks.shape[1]
        if m == 0:
            continue  # an empty row (padding of a CUDA-graph batch)
        if not causal or m == n:
            out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale, enable_gqa=True)
        else:
            keys_seen = torch.arange(m, device=q.device).unsqueeze(1) + (n - m)
            mask = torch.arange(n, device=q.device).unsqueeze(0) <= keys_seen
            out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)


def _fa4(heads: int, kv_heads: int, scale: float, causal: bool) -> Varlen | None:
    if torch.cuda.get_device_capability()[0] not in (9, 10):
        return None
    try:
        interface: Any = importlib.import_module("flash_attn.cute.interface")
    except Exception as exc:  # not installed, or installed without what it needs
        log.debug("FlashAttention 4 not available: %s", exc)
        return None
    # Its compiler warns, at each compilation, of an argument it treats as a constant (harmless).
    warnings.filterwarnings("ignore", message="Argument aux_data .* JitArgument", category=UserWarning)
    run = interface.flash_attn_varlen_func

    def attend(q, k, v, cu_q, cu_k, max_q, max_k):  # type: ignore[no-untyped-def]
        out = run(
            q,
            k,
            v,
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k,
            max_seqlen_q=max_q,
            max_seqlen_k=max_k,
            softmax_scale=scale,
            causal=causal,
        )
        return out[0] if isinstance(out, tuple) else out

    return attend


def _torch_varlen(heads: int, kv_heads: int, scale: float, causal: bool) -> Varlen | None:
    """torch's variable-length FA2. Its signature changed between releases: causal is
    `window_size=(-1, 0)` or `is_causal=True`; GQA needs `enable_gqa` or repeated heads."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    extra: dict[str, Any] = {}
    if causal and "window_size" in params:
        extra["window_size"] = (-1, 0)
    elif causal and "is_causal" in params:
        extra["is_causal"] = True
    elif causal:
        return None
    if "scale" in params:
        extra["scale"] = scale
    gqa = "enable_gqa" in params
    if gqa and heads != kv_heads:
        extra["enable_gqa"] = True
    groups = heads // kv_heads

    def attend(q, k, v, cu_q, cu_k, max_q, max_k):  # type: ignore[no-untyped-def]
        if not gqa and groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **extra)

    return attend


def _agrees(
    attend: Varlen,
    heads: int,
    kv_heads: int,
    dim: int,
    scale: float,
    causal: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> bool:
    """*attend* against row-by-row SDPA on two rows, one with more keys than queries: an API whose
    causal mask were aligned top-left, or that read its offsets otherwise, fails here."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    query_starts, key_starts = ([0, 40, 140], [0, 100, 200]) if causal else ([0, 100, 200], [0, 100, 200])
    q = torch.randn(query_starts[-1], heads, dim, generator=generator).to(device, dtype)
    k = torch.randn(key_starts[-1], kv_heads, dim, generator=generator).to(device, dtype)
    v = torch.randn(key_starts[-1], kv_heads, dim, generator=generator).to(device, dtype)
    expected = attention_by_rows(q, k, v, query_starts, key_starts, scale, causal)
    try:
        cu_q = torch.tensor(query_starts, dtype=torch.int32, device=device)
        cu_k = torch.tensor(key_starts, dtype=torch.int32, device=device)
        got = attend(q, k, v, cu_q, cu_k, 100, 100)
        error = float((got.float() - expected.float()).abs().max())
    except Exception:  # an API of another shape
        log.warning("a varlen attention failed its check; not used", exc_info=True)
        return False
    if error > 0.05:
        log.warning("a varlen attention differs from SDPA by %.3f; not used", error)
        return False
    return True


def varlen_attention(
    heads: int,
    kv_heads: int,
    dim: int,
    scale: float,
    *,
    causal: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[str, Varlen] | None:
    """The fastest variable-length attention that passes its check on *device*, with its name;
    None on a CPU or when none does (then attend row by row). FlashAttention 4's Python wrapper
    costs more host time per call than torch's C++ op; both callers replay it in CUDA graphs
    (the vision encoder's and the prefill's), where host time is not spent per call."""
    if device.type != "cuda":
        return None
    for name, make in ((FA4, _fa4), ("torch varlen FA2", _torch_varlen)):
        attend = make(heads, kv_heads, scale, causal)
        if attend is not None and _agrees(attend, heads, kv_heads, dim, scale, causal, device, dtype):
            return name, attend
    return None
