"""The vision encoder's blocks with their elementwise work fused, on CUDA.

A stock Qwen3-VL vision block is `x + attn(norm1(x))`, then `x + mlp(norm2(x))` with the MLP
`fc2(gelu_tanh(fc1(h)))`. Around its GEMMs and attention it launches two LayerNorms, two
residual adds and a GELU, each a full pass over the picture's patches: on an H200 ~55 us a
layer for one 1024x1024 picture (torch's LayerNorm 11.5 us at 4096x1024, GELU 19.7 us over the
4096-wide intermediate, adds 6.2 us), ~1.4 ms of the encoder's 9.4 ms a picture
(bench/profile_prefill.py, 2026-12-02). Here each block runs:

    LayerNorm | attention | add + LayerNorm (one pass; kernels.py's norm kernel) | fc1 with GELU in the
    GEMM's epilogue (cuBLASLt, `torch._addmm_activation`) | fc2 | add

with the stock rounding points: the residual sum is rounded to the model's dtype before it is
normalised, LayerNorm computes in float32 and rounds once; the epilogue's GELU is the tanh
approximation the checkpoint names (`gelu_pytorch_tanh`), applied to the float32 GEMM result
(the stock code rounds fc1's output first: a difference within bf16 rounding).

`fuse_vision_blocks` checks the fused pieces against the stock ones on the device first
(`_pieces_agree`); disagreeing, the blocks stay stock with a warning. Only CUDA: on the CPU
cuBLASLt's epilogue does not exist (`_addmm_activation` computes the exact GELU there). On an
H200: 9.33 -> 8.41 ms a picture, teacher forcing unchanged (bench/results/h200-2026-12-02-run20).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .agreement import relative_error
from .kernels import layer_norm

log = logging.getLogger("vlbridge.model.vision")

TANH_GELU = "gelu_pytorch_tanh"


def gelu_fc1(fc1: Any, h: torch.Tensor) -> torch.Tensor:
    """`gelu_tanh(fc1(h))` as one cuBLASLt GEMM with a bias + GELU epilogue."""
    flat = h.reshape(-1, h.shape[-1])
    out = torch._addmm_activation(fc1.bias, flat, fc1.weight.t(), use_gelu=True)
    return out.view(*h.shape[:-1], out.shape[-1])


def _block_forward(block: Any, gelu: bool) -> Any:
    attn, mlp, norm1, norm2 = block.attn, block.mlp, block.norm1, block.norm2

    def forward(hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        attended = attn(layer_norm(norm1, hidden_states), cu_seqlens=cu_seqlens, **kwargs)
        h, x = layer_norm(norm2, hidden_states, attended)
        inner = gelu_fc1(mlp.linear_fc1, h) if gelu else mlp.act_fn(mlp.linear_fc1(h))
        return x + mlp.linear_fc2(inner)

    return forward


@torch.inference_mode()
def _pieces_agree(block: Any, gelu: bool) -> bool:
    """The fused LayerNorm, add + LayerNorm and GELU GEMM against the stock modules of *block*, on
    random patches of its device and dtype (bf16 rounding passes, a wrong kernel does not)."""
    weight = block.norm1.weight
    generator = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(weight.device, weight.dtype)

    x, delta = rand(333, weight.shape[0]), rand(333, weight.shape[0])
    checks = [(layer_norm(block.norm1, x), block.norm1(x))]
    normed, total = layer_norm(block.norm2, x, delta)
    checks += [(total, x + delta), (normed, block.norm2(x + delta))]
    if gelu:
        fc1 = block.mlp.linear_fc1
        checks.append((gelu_fc1(fc1, normed), torch.nn.functional.gelu(fc1(normed), approximate="tanh")))
    return all(relative_error(got, expected) < 0.02 for got, expected in checks)


def _qwen_shaped(block: Any) -> bool:
    norms = (getattr(block, "norm1", None), getattr(block, "norm2", None))
    return (
        hasattr(block, "attn")
        and hasattr(block, "mlp")
        and all(isinstance(n, torch.nn.LayerNorm) for n in norms)
    )


def fuse_vision_blocks(visual: Any) -> bool:
    """Run *visual*'s blocks fused (see the module doc) if its pieces agree with the stock ones on its
    device; whether they do. Blocks of another shape than Qwen3-VL's are left as they are."""
    blocks = list(getattr(visual, "blocks", []))
    if not blocks or not all(_qwen_shaped(block) for block in blocks):
        return False
    gelu = getattr(visual.config, "hidden_act", None) == TANH_GELU
    try:
        agree = _pieces_agree(blocks[0], gelu)
    except Exception:  # a Triton or cuBLASLt that cannot run them here
        log.warning(
            "fused vision blocks failed their check; the encoder runs its stock blocks", exc_info=True
        )
        return False
    if not agree:
        log.warning("fused vision blocks disagree with the stock ones on this GPU; keeping the stock blocks")
        return False
    for block in blocks:
        block.forward = _block_forward(block, gelu)
    return True
