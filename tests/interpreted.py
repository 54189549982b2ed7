"""Checks of the CUDA paths' Triton kernels on the CPU, through Triton's interpreter
(tests/test_triton_interpreted.py runs each in a child process with TRITON_INTERPRET=1, which
Triton reads when a kernel is defined).

    TRITON_INTERPRET=1 python -m tests.interpreted experts|fused|fused-moe

The interpreter multiplies bfloat16 wrongly (triton 3.9: `tl.dot` of two bf16 blocks is off by
~1e10), so the kernels run on float16 and float32 tensors here; the GPU runs them on bf16.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch


def check_experts() -> None:
    """float8_gemm.experts against the float32 reference (`Float8Experts._reference`), with
    bf16-like (here float16) and float8 activations: routing spread and concentrated (an
    expert's pairs in several blocks), several tiles."""
    from types import SimpleNamespace

    from server.inference.model import float8, float8_gemm
    from server.inference.model.agreement import relative_error
    from server.inference.model.float8_gemm import Tiles

    cases = [  # experts, hidden, inter, tokens, per token, skew, tiles
        (8, 128, 128, 6, 3, 0.0, None),
        (8, 128, 128, 40, 2, 6.0, None),
        (16, 256, 128, 64, 4, 8.0, (Tiles(16, 64, 64), Tiles(32, 32, 32))),
        (6, 128, 64, 50, 2, 0.0, (Tiles(64, 32, 128, 4, 2), Tiles(16, 128, 64, 8, 3))),
    ]
    generator = torch.Generator().manual_seed(0)
    for count, hidden, inter, tokens, chosen, skew, tiles in cases:
        experts = SimpleNamespace(
            gate_up_proj=torch.randn(count, 2 * inter, hidden, generator=generator),
            down_proj=torch.randn(count, hidden, inter, generator=generator),
            act_fn=torch.nn.SiLU(),
        )
        layer = float8.Float8Experts(experts, kernel=False)
        x = torch.randn(tokens, hidden, generator=generator).half()
        logits = torch.randn(tokens, count, generator=generator) + skew * torch.randn(
            count, generator=generator
        )
        weights, index = torch.softmax(logits, -1).topk(chosen, dim=-1)
        weights = weights.half()
        crowded = int(index.reshape(-1).bincount().max())
        for float8_activations in (False, True):
            got = float8_gemm.experts(
                x, index, weights, layer.gate_up, layer.gate_up_scale, layer.down, layer.down_scale,
                layer.bounds, tiles=tiles, float8_activations=float8_activations,
            )  # fmt: skip
            want = layer._reference(x, index, weights, float8_activations)
            error = relative_error(got, want)
            print(
                f"experts {count}, tokens {tokens}, most pairs an expert {crowded}, tiles {tiles},"
                f" float8 activations {float8_activations}: {error:.2e}"
            )
            assert got.shape == want.shape and error < 5e-3, error


def check_fused(experts: bool) -> None:
    """The engine's CUDA paths (fused kernels.py kernels, paged attention) run eagerly against
    its CPU paths on the demo model (float32): prefill and decode logits agree to ~1e-6."""
    from protocol.pictures import ImageLimits
    from server.inference.api import SamplingParams, Turn
    from server.inference.engine import Sequence
    from server.inference.model.demo import build_demo_model
    from server.inference.model.model_engine import EngineOptions, ModelEngine
    from tests.conftest import make_png

    demo = build_demo_model(Path(tempfile.mkdtemp()) / "demo", experts=experts)
    engine = ModelEngine.load(
        str(demo),
        device="cpu",
        dtype="float32",
        limits=ImageLimits(),
        options=EngineOptions(max_batch=4, max_context_tokens=2048, prefix_cache=False),
    )
    conversations = [
        [Turn.user("What is this?", [make_png(320, 256)])],
        [Turn.user("Hello there, two?", [make_png(96, 64, (9, 200, 30)), make_png(64, 160)])],
    ]

    def run() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        seqs = [
            Sequence(str(i), engine.prepare(turns), SamplingParams(max_new_tokens=6), 6)
            for i, turns in enumerate(conversations)
        ]
        for seq in seqs:
            assert engine.reserve(seq)
        engine.keep_logits = True
        engine.prefill(seqs)
        assert engine.prefill_logits is not None
        prefill = [logits.clone() for logits in engine.prefill_logits]
        steps = []
        for _ in range(5):
            engine.decode(seqs).tokens()
            steps.append(engine.step.logits[: len(seqs)].clone())
        for seq in seqs:
            engine.release(seq)
        return prefill, steps

    stock = run()
    from server.inference.model.kernels import fuse_projections

    fuse_projections(engine.model)
    engine.forward.fused = True
    engine.step._forward = engine.step._forward_fused  # type: ignore[method-assign]  # eagerly
    fused = run()
    for name, want, got in zip(("prefill", "decode"), stock, fused, strict=True):
        for a, b in zip(want, got, strict=True):
            difference = float((a - b).abs().max())
            print(f"{name}: largest difference {difference:.2e} of logits up to {float(a.abs().max()):.2f}")
            assert difference < 1e-4 and torch.equal(a.argmax(-1), b.argmax(-1)), difference


if __name__ == "__main__":
    {
        "experts": check_experts,
        "fused": lambda: check_fused(experts=False),
        "fused-moe": lambda: check_fused(experts=True),
    }[sys.argv[1]]()
