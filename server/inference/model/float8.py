"""float8 weights for the language model (W8A8, opt-in: `model.weights_dtype = "fp8"`).

Why: 8B and 30B-A3B keep an H200 busy 97% in bf16 (docs/executor.md): their prefill is GEMMs
at ~640 TFLOP/s and their decode step reads every weight once. float8 e4m3 halves the weights'
bytes and doubles the tensor cores' rate.

How: each output channel of a weight gets its own scale (its largest |w| / 448), computed once
at load (`quantize_weight`); each row of activations (a token) its own, at run time
(`quantize_rows`: one Triton kernel on CUDA, torch on the CPU). `torch._scaled_mm` multiplies
the float8 operands and applies both scales in float32 in its epilogue, the output in the
model's dtype.

What changes: the linear layers of the language model's decoder layers (q/k/v, o, gate/up,
down). What stays in the model's dtype: embeddings, `lm_head`, norms, the vision encoder, and
the experts of a mixture-of-experts model (30B-A3B): torch's float8 grouped GEMM
(`_scaled_grouped_mm`) took 2.2x the time of bf16's `grouped_mm` at a prefill's size on an
H200, and its CUDA graphs disagreed with its eager runs (bench/float8_gemms.py, docs/executor.md).

The logits are no longer the checkpoint's bf16 ones, so this is opt-in. Checked: at start-up
against the same product in float32 arithmetic (`works`: a GPU whose kernels fail or disagree
keeps the model's dtype, with a warning); by teacher forcing (`bench/gpu_check.py --weights-dtype
fp8`) against bf16 and against stock transformers with the same roundings (`simulated`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

log = logging.getLogger("vlbridge.model")

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8 e4m3fn
TINY = 1e-12  # the smallest row maximum a scale divides by (a row of zeros stays zeros)
FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}  # kernels.py


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., out, in) weights: float8 values and float32 scales (..., out), one per output
    channel, so that values * scales[..., None] is the weight up to float8's rounding."""
    scale = weight.abs().amax(dim=-1, keepdim=True).float().clamp(min=TINY) / FP8_MAX
    return (weight.float() / scale).to(FP8), scale.squeeze(-1)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, n) activations: float8 values and float32 scales (rows, 1), one per row."""
    return _quantize_rows_triton(x) if x.is_cuda else _quantize_rows_torch(x)


def _quantize_rows_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=TINY) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def _quantize_rows_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import triton

    from .kernels import quantize_rows_kernel

    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, n = x.shape
    q = torch.empty((rows, n), dtype=FP8, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(n)
    quantize_rows_kernel[(rows,)](
        x, q, scale, x.stride(0), n, TINY, FP8_MAX, BLOCK=block, num_warps=min(16, max(4, block // 1024))
    )
    return q, scale


class Float8Linear(torch.nn.Module):
    """A bias-free linear layer over float8 weights and float8 activations (module doc)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        values, scale = quantize_weight(weight.detach())
        self.register_buffer("weight", values)  # (out, in): its .t() is the column-major operand
        self.register_buffer("scale", scale.unsqueeze(0))  # (1, out)
        self.out_dtype = weight.dtype
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scale = quantize_rows(x.reshape(-1, self.in_features))
        out = torch._scaled_mm(
            q, self.weight.t(), scale_a=scale, scale_b=self.scale, out_dtype=self.out_dtype
        )
        return out.view(*x.shape[:-1], self.out_features)


def quantize_language_model(model: Any) -> int:
    """Replace the decoder layers' linear layers by float8 ones, in place; the number replaced.
    The parts of a fused projection (`kernels.fuse_projections`: `qkv`, `gate_up`) are removed,
    so that the fused weight's memory, which they view, is freed."""
    replaced = 0
    for layer in model.model.language_model.layers:
        for block in (layer.self_attn, layer.mlp):
            for fused, parts in FUSED.items():
                if hasattr(block, fused):
                    for part in parts:
                        delattr(block, part)
            for name, child in list(block.named_children()):
                if isinstance(child, torch.nn.Linear):
                    if child.bias is not None:
                        raise ValueError(f"float8 weights: biased {name} is not supported")
                    setattr(block, name, Float8Linear(child.weight))
                    replaced += 1
    if next(model.parameters()).is_cuda:
        torch.cuda.empty_cache()
    return replaced


def works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether float8 GEMMs run on *device* and agree with the dequantized reference: a torch or
    GPU without row-wise float8 GEMMs fails here."""
    from .agreement import relative_error

    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(48, 256, generator=generator, device=device).to(dtype)
    weight = torch.randn(128, 256, generator=generator, device=device).to(dtype)
    try:
        error = relative_error(Float8Linear(weight)(x), _dequantized(x, weight))
    except (RuntimeError, TypeError):  # torch's "no kernel for this device" is a RuntimeError too
        log.warning("float8 weights: the GEMMs failed on %s; keeping %s", device, dtype, exc_info=True)
        return False
    if error > 0.05:
        log.warning("float8 weights: the GEMMs disagree with the reference (%.3f); keeping %s", error, dtype)
        return False
    return True


def _dequantized(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T through float8's roundings, multiplied in float32: a float8 GEMM's reference."""
    values, scale = quantize_weight(weight)
    return _reference_product(x, values, scale)


def _reference_product(x: torch.Tensor, values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    q, row_scale = _quantize_rows_torch(x)
    return (q.float() * row_scale) @ (values.float() * scale.unsqueeze(-1)).t()


class _Reference(torch.nn.Module):
    """A linear layer computed as `Float8Linear` would be, in plain float32 arithmetic (torch's
    rounding of the activations, no float8 GEMM): the reference that tells the engine's bugs
    from float8's rounding."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.values, self.scale = quantize_weight(weight.detach())
        self.out_dtype = weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _reference_product(x.reshape(-1, x.shape[-1]), self.values, self.scale)
        return out.to(self.out_dtype).view(*x.shape[:-1], -1)


@contextlib.contextmanager
def simulated(model: Any) -> Iterator[None]:
    """Within: the decoder layers' linear layers of *model* (stock, not yet fused) compute as
    `quantize_language_model` would make them, by `_Reference`; restored on exit. Teacher
    forcing of `model.weights_dtype = "fp8"` compares the engine with this forward."""
    swapped = []
    for layer in model.model.language_model.layers:
        for block in (layer.self_attn, layer.mlp):
            for name, child in list(block.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(block, name, _Reference(child.weight))
                    swapped.append((block, name, child))
    try:
        yield
    finally:
        for block, name, child in swapped:
            setattr(block, name, child)
