"""float8 weights for the language model (W8A8 and W8A16, opt-in: `model.weights_dtype = "fp8"`).

Why: 8B and 30B-A3B keep an H200 busy 97% in bf16 (docs/executor.md): their prefill is GEMMs
at ~640 TFLOP/s and their decode step reads every weight once. float8 e4m3 halves the weights'
bytes and doubles the tensor cores' rate.

How: each output channel of a weight gets its own scale (its largest |w| / 448), computed once
at load (`quantize_weight`); each row of activations (a token) its own, at run time
(`quantize_rows`: one Triton kernel on CUDA, torch on the CPU). `torch._scaled_mm` multiplies
the float8 operands and applies both scales in float32 in its epilogue, the output in the
model's dtype.

What changes: the linear layers of the language model's decoder layers (q/k/v, o, gate/up,
down), and the experts of a mixture-of-experts model (30B-A3B, `Float8Experts`), multiplied by
float8_gemm.py's kernel, which widens the float8 weights to the activations' dtype as it reads
them (W8A16): their GEMMs at a decode step are many small ones bound by reading the weights
(torch's float8 grouped GEMM, `_scaled_grouped_mm`, took 2.2x the time of bf16's `grouped_mm`
at a prefill's size on an H200 and its CUDA graphs disagreed with its eager runs); a prefill's
rows go through the same kernel with float8 activations (W8A8: 1.55x bf16's `grouped_mm` at
4096 rows on an H200) where that was measured fastest (`prefill_mode`). What stays in
the model's dtype: embeddings, `lm_head`, norms, the routers, and the vision encoder.

Where float8 is not faster, the model's own weights do the work if the GPU has room for both
(a share ROOM of its memory left free: `_room`): dense layers up to DECODE_ROWS rows (a decode
step: no float8 GEMM tried beats bf16 at 32-64 rows). Experts above DECODE_ROWS rows (a
prefill) take the fastest of bf16 (kept), W8A16 and W8A8 measured on the GPU for their shape
(`prefill_mode`). Measured in bench/float8_gemms.py, bench/float8_experts.py and
docs/executor.md.

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
DECODE_ROWS = 64  # a decode step's rows at most (c=64): see Float8Linear and Float8Experts
ROOM = 0.25  # the model's own weights are kept beside float8's while this share of the GPU stays free
PREFILL_MODES = ("bf16", "w8a8", "w8a16")  # how float8 experts may take a prefill's rows: Float8Experts
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
    """A bias-free linear layer over float8 weights and float8 activations (module doc). With
    *keep*, the model's own weight stays beside them and multiplies up to DECODE_ROWS rows (a
    decode step), where the float8 GEMM is no faster (bench/float8_gemms.py)."""

    def __init__(self, weight: torch.Tensor, keep: bool = False) -> None:
        super().__init__()
        values, scale = quantize_weight(weight.detach())
        self.register_buffer("weight", values)  # (out, in): its .t() is the column-major operand
        self.register_buffer("scale", scale.unsqueeze(0))  # (1, out)
        self.register_buffer("kept", weight.detach() if keep else None)
        self.out_dtype = weight.dtype
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kept is not None and x.numel() <= DECODE_ROWS * self.in_features:
            return torch.nn.functional.linear(x, self.kept)
        q, scale = quantize_rows(x.reshape(-1, self.in_features))
        out = torch._scaled_mm(
            q, self.weight.t(), scale_a=scale, scale_b=self.scale, out_dtype=self.out_dtype
        )
        return out.view(*x.shape[:-1], self.out_features)


class Float8Experts(torch.nn.Module):
    """The experts of a mixture-of-experts block (transformers' `...TextExperts`: `gate_up_proj`
    (experts, 2 * inter, hidden) holding [gate | up], `down_proj` (experts, hidden, inter), SiLU)
    over float8 weights with a scale per expert and output channel; its forward is theirs. On CUDA
    float8_gemm.py's kernel multiplies (W8A16); elsewhere, and with `kernel=False`, the same
    arithmetic in float32 (the reference). *prefill* says how more than DECODE_ROWS tokens (a
    prefill's) are multiplied: "w8a16" as a decode step's, "w8a8" with float8 activations too
    (float8 tensor cores), "bf16" by the model's own experts, kept beside (`prefill_mode`)."""

    def __init__(self, experts: Any, kernel: bool = True, prefill: str = "w8a16") -> None:
        super().__init__()
        if type(getattr(experts, "act_fn", None)).__name__ not in ("SiLU", "SiLUActivation") or any(
            getattr(experts, flag, False) for flag in ("is_transposed", "has_bias")
        ):
            raise ValueError("float8 experts: only bias-free SiLU-gated experts, (out, in) weights")
        for name in ("gate_up", "down"):
            values, scale = quantize_weight(getattr(experts, f"{name}_proj").detach())
            self.register_buffer(name, values)
            self.register_buffer(f"{name}_scale", scale)
        self.register_buffer("bounds", torch.arange(self.gate_up.shape[0] + 1, device=self.gate_up.device))
        if prefill not in PREFILL_MODES:
            raise ValueError(f"float8 experts: prefill {prefill!r} is none of {PREFILL_MODES}")
        self.kernel = kernel
        self.prefill = prefill
        self.kept = experts if prefill == "bf16" else None

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        prefill = hidden_states.shape[0] > DECODE_ROWS
        if prefill and self.kept is not None:
            return self.kept(hidden_states, top_k_index, top_k_weights)
        float8_activations = prefill and self.prefill == "w8a8"
        if self.kernel and hidden_states.is_cuda:
            from .float8_gemm import experts

            return experts(
                hidden_states, top_k_index, top_k_weights,
                self.gate_up, self.gate_up_scale, self.down, self.down_scale, self.bounds,
                float8_activations=float8_activations,
            )  # fmt: skip
        return self._reference(hidden_states, top_k_index, top_k_weights, float8_activations)

    def _reference(
        self,
        x: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        float8_activations: bool = False,
    ) -> torch.Tensor:
        """What the kernel computes (`float8_gemm.experts`), in float32 arithmetic."""

        def rows(a: torch.Tensor) -> torch.Tensor:
            if not float8_activations:
                return a.float()
            q, scale = _quantize_rows_torch(a)
            return q.float() * scale

        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for expert in top_k_index.unique().tolist():
            token, slot = torch.where(top_k_index == expert)
            gate_up = (
                rows(x[token]) @ (self.gate_up[expert].float() * self.gate_up_scale[expert, :, None]).t()
            )
            gate, up = gate_up.chunk(2, dim=-1)
            hidden = (torch.nn.functional.silu(gate) * up).to(x.dtype)  # the kernel stores it so
            down = rows(hidden) @ (self.down[expert].float() * self.down_scale[expert, :, None]).t()
            out.index_add_(0, token, down * top_k_weights[token, slot, None].float())
        return out.to(x.dtype)


def _room(*weights: torch.Tensor) -> bool:
    """Whether the GPU holding *weights* keeps them beside their float8 copies: a share ROOM of its
    memory stays free once it also holds the copies (memory the KV cache would otherwise get)."""
    if not weights[0].is_cuda:
        return False
    free, total = torch.cuda.mem_get_info(weights[0].device)
    return free - sum(w.numel() for w in weights) > ROOM * total  # a float8 element is a byte


def prefill_mode(experts: Any) -> str:
    """How *experts* (transformers' module) take a prefill's tokens once in float8: the fastest of
    PREFILL_MODES measured on their GPU for their shape (`float8_gemm.prefill_modes`, from
    bench/float8_experts.py), "bf16" only where the GPU has room to keep them (`_room`);
    unmeasured, "bf16" where it has room (an H200 before W8A8 was measured), else "w8a16"."""
    ranked = ["bf16", "w8a16"]
    if experts.gate_up_proj.is_cuda:
        from .float8_gemm import prefill_modes

        ranked = prefill_modes(experts.gate_up_proj.device, *experts.down_proj.shape[1:]) or ranked
    room = _room(experts.gate_up_proj, experts.down_proj)
    return next(mode for mode in [*ranked, "w8a16"] if mode != "bf16" or room)


def quantize_language_model(model: Any) -> int:
    """Replace the decoder layers' linear layers (and experts) by float8 ones, in place; the number
    replaced. The parts of a fused projection (`kernels.fuse_projections`: `qkv`, `gate_up`) are
    removed, so that the fused weight's memory, which they view, is freed."""
    replaced = 0
    for layer in model.model.language_model.layers:
        if hasattr(layer.mlp, "experts"):
            experts = layer.mlp.experts
            layer.mlp.experts = Float8Experts(experts, prefill=prefill_mode(experts))
            replaced += 1
        for block in (layer.self_attn, layer.mlp):
            for fused, parts in FUSED.items():
                if hasattr(block, fused):
                    for part in parts:
                        delattr(block, part)
            for name, child in list(block.named_children()):
                if isinstance(child, torch.nn.Linear):
                    if child.bias is not None:
                        raise ValueError(f"float8 weights: biased {name} is not supported")
                    setattr(block, name, Float8Linear(child.weight, keep=_room(child.weight)))
                    replaced += 1
    if next(model.parameters()).is_cuda:
        torch.cuda.empty_cache()
    return replaced


def works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the float8 kernels run on *device* and agree with their references: a linear layer
    (a torch or GPU without row-wise float8 GEMMs fails here) and experts, with a decode step's
    and a prefill's rows (float8 activations)."""
    from types import SimpleNamespace

    from .agreement import relative_error

    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device).to(dtype)

    weight = randn(128, 256)
    experts = SimpleNamespace(
        gate_up_proj=randn(8, 128, 256), down_proj=randn(8, 256, 64), act_fn=torch.nn.SiLU()
    )
    try:
        x = randn(48, 256)
        errors = {"linear": relative_error(Float8Linear(weight)(x), _dequantized(x, weight))}
        for mode, rows in (("w8a16", 24), ("w8a8", DECODE_ROWS + 8)):  # a decode step's rows, a prefill's
            index = torch.rand(rows, 8, generator=generator, device=device).topk(2, dim=-1).indices
            routing = torch.softmax(randn(rows, 2).float(), dim=-1).to(dtype)
            x = randn(rows, 256)
            errors[f"experts {mode}"] = relative_error(
                Float8Experts(experts, prefill=mode)(x, index, routing),
                Float8Experts(experts, kernel=False, prefill=mode)(x, index, routing),
            )
    except (RuntimeError, TypeError):  # torch's "no kernel for this device" is a RuntimeError too
        log.warning("float8 weights: the kernels failed on %s; keeping %s", device, dtype, exc_info=True)
        return False
    if max(errors.values()) > 0.05:
        log.warning("float8 weights: the kernels disagree with the reference (%s); keeping %s", errors, dtype)
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
                    swapped.append((block, name, child))
                    setattr(block, name, _Reference(child.weight))
                elif name == "experts":
                    swapped.append((block, name, child))
                    setattr(block, name, Float8Experts(child, kernel=False, prefill=prefill_mode(child)))
    try:
        yield
    finally:
        for block, name, child in swapped:
            setattr(block, name, child)
