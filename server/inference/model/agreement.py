"""How a fast path is checked against its reference before it serves (CUDA graphs, fused kernels,
the float8 cache): the largest difference relative to the reference's largest value."""

from __future__ import annotations

import torch


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest difference of *got* from *expected* over *expected*'s largest magnitude, in
    float32: bf16 rounding gives ~1e-2, a wrong kernel (a wrong page, offset or rounding point) ~1."""
    reference = expected.float()
    scale = float(reference.abs().max()) or 1.0
    return float((got.float() - reference).abs().max()) / scale
