"""float8 weights (`model.weights_dtype = "fp8"`, server/inference/model/float8.py) on the CPU.

The CUDA side (the Triton activation kernel, `_scaled_mm` on the GPU, the fused projections) is
checked at start-up against the same reference (`float8.works`) and by bench/gpu_check.py; the
experts' Triton kernel also through Triton's interpreter (tests/test_triton_interpreted.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from bench.gpu_check import FLOAT8_REFERENCE, check_teacher_forcing
from server.inference.api import Done, InferenceRequest, SamplingParams, Turn
from server.inference.model import float8
from server.inference.model.agreement import relative_error
from server.inference.model.demo import build_demo_model
from server.inference.model.loader import load_model
from server.inference.model.model_engine import EngineOptions, ModelEngine
from tests.conftest import make_png
from tests.executors import demo_executor


def test_a_float8_linear_layer_is_its_reference_and_scales_each_row_and_channel() -> None:
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(96, 128, generator=generator)
    weight[5] *= 1000  # one loud output channel: its own scale, the others keep their precision
    x = torch.randn(16, 128, generator=generator)
    x[2] *= 1e-4  # a quiet token: its own scale
    x[7] = 0  # nothing to scale
    layer = float8.Float8Linear(weight)
    assert layer.weight.dtype == float8.FP8 and layer.weight.shape == (96, 128)
    out = layer(x.view(4, 4, 128))
    assert out.shape == (4, 4, 96)
    out = out.view(16, 96)
    assert torch.equal(out, float8._dequantized(x, weight))
    exact = x @ weight.t()
    assert torch.equal(out[7], torch.zeros(96))
    for row in (0, 2):
        for columns in (slice(0, 5), slice(6, 96)):
            error = relative_error(out[row, columns], exact[row, columns])
            assert 1e-3 < error < 0.1, (row, columns, error)  # float8's rounding, and only that


def test_a_kept_weight_multiplies_a_decode_steps_rows_and_float8_a_prefills() -> None:
    """Where the GPU has room (`float8._room`), a layer keeps the model's weight for up to
    DECODE_ROWS rows, where float8's GEMM is no faster (bench/float8_gemms.py)."""
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(96, 128, generator=generator)
    layer = float8.Float8Linear(weight, keep=True)
    step = torch.randn(float8.DECODE_ROWS, 128, generator=generator)
    assert relative_error(layer(step), step @ weight.t()) < 1e-6  # the weight itself, unrounded
    prefill = torch.randn(float8.DECODE_ROWS + 1, 128, generator=generator)
    assert torch.equal(layer(prefill), float8._dequantized(prefill, weight))
    assert float8.Float8Linear(weight).kept is None


@pytest.fixture(scope="module")
def experts_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The demo model's mixture-of-experts twin (8 experts, 2 a token), float32 on the CPU."""
    return load_model(
        str(build_demo_model(tmp_path_factory.mktemp("moe"), experts=True)), "cpu", "float32"
    ).model


def test_float8_experts_are_their_reference_and_take_a_prefill_as_told(experts_model: Any) -> None:
    """A decode step's tokens through float8 weights; a prefill's (more than DECODE_ROWS) as
    *prefill* says: the same (W8A16), with float8 activations too (W8A8), or the model's own."""
    experts = experts_model.model.language_model.layers[0].mlp.experts
    generator = torch.Generator().manual_seed(5)
    tokens = 3 * float8.DECODE_ROWS
    x = torch.randn(tokens, experts.gate_up_proj.shape[-1], generator=generator)
    weights, index = torch.softmax(torch.randn(tokens, 8, generator=generator), -1).topk(2, dim=-1)
    step = slice(0, float8.DECODE_ROWS)
    with torch.no_grad():
        exact = experts(x, index, weights)
        rounded = float8.Float8Experts(experts)(x, index, weights)
        kept = float8.Float8Experts(experts, prefill="bf16")
        assert torch.equal(kept(x, index, weights), exact)  # a prefill's tokens: the model's experts
        assert relative_error(kept(x[step], index[step], weights[step]), rounded[step]) < 1e-6
        w8a8 = float8.Float8Experts(experts, prefill="w8a8")
        both = w8a8(x, index, weights)
        assert torch.equal(both, w8a8._reference(x, index, weights, float8_activations=True))
        assert relative_error(w8a8(x[step], index[step], weights[step]), rounded[step]) < 1e-6
    assert 1e-3 < relative_error(rounded, exact) < 0.1  # float8's rounding, and only that
    assert relative_error(rounded, exact) < relative_error(both, exact) < 0.1  # the activations' too
    with pytest.raises(ValueError, match="prefill"):
        float8.Float8Experts(experts, prefill="fp4")
    for token in (0, 1):  # each (token, expert) pair weighted by its routing weight
        alone = [float8.Float8Experts(experts)(x[token : token + 1], index[token : token + 1, [k]],
                                               torch.ones(1, 1)) for k in (0, 1)]  # fmt: skip
        mixed = weights[token, 0] * alone[0] + weights[token, 1] * alone[1]
        assert relative_error(rounded[token : token + 1], mixed) < 1e-5


def test_teacher_forcing_with_float8_experts_matches_the_float8_reference() -> None:
    """The demo's mixture-of-experts twin in float8 against `float8.simulated` (its experts
    included): as close as the dense model."""
    report = check_teacher_forcing("demo-moe", 8, "cpu", weights_dtype="fp8")
    result = report["cold"]
    assert isinstance(result, dict)
    simulated = result[FLOAT8_REFERENCE]
    assert simulated["prefill_max_rel_err"] < 0.1 and simulated["decode_max_rel_err"] < 0.1, result
    assert simulated["prefill_top1"] >= 0.95 and simulated["decode_top1"] >= 0.95, result
    assert result["prefill_median_rel_err"] > 0.02, result  # the float8 experts ran


def test_teacher_forcing_with_float8_weights_matches_the_float8_reference() -> None:
    """The engine with float8 weights against stock transformers with the same roundings
    (`float8.simulated`): close at every position. A bug as small as one input channel
    dropped gives ~0.7 (measured); float8's own rounding against the plain model ~0.2."""
    report = check_teacher_forcing("demo", 8, "cpu", weights_dtype="fp8")
    for name in ("cold", "prefix cache", "vision cache"):
        result = report[name]
        assert isinstance(result, dict)
        simulated = result[FLOAT8_REFERENCE]
        assert simulated["prefill_max_rel_err"] < 0.1 and simulated["decode_max_rel_err"] < 0.1, (
            name,
            result,
        )
        assert simulated["prefill_top1"] >= 0.95 and simulated["decode_top1"] >= 0.95, (name, result)
        assert result["prefill_median_rel_err"] > 0.02, (name, result)  # the float8 layers ran


def test_simulated_float8_restores_the_model(demo_model_dir: Path) -> None:
    from server.inference.model.loader import load_model

    model = load_model(str(demo_model_dir), "cpu", "float32").model
    layer = model.model.language_model.layers[0]
    before = layer.self_attn.q_proj
    with float8.simulated(model):
        assert not isinstance(layer.self_attn.q_proj, torch.nn.Linear)
        assert not isinstance(layer.mlp.down_proj, torch.nn.Linear)
    assert layer.self_attn.q_proj is before


async def test_the_executor_answers_with_float8_weights(demo_model_dir: Path) -> None:
    """`model.weights_dtype = "fp8"` through the real executor: every linear layer of the
    decoder layers is float8 and answers come as usual, greedy ones other than float32's (the
    float8 rounding shows: it is used)."""
    answers = {}
    for dtype in ("fp8", "auto"):
        options = EngineOptions(max_batch=2, max_context_tokens=1024, max_new_tokens=24, weights_dtype=dtype)
        executor = demo_executor(demo_model_dir, options)
        await executor.start()
        try:
            await executor.wait_ready(60)
            engine = executor._engine
            assert isinstance(engine, ModelEngine)
            layers = engine.runner.model.model.language_model.layers
            linears = [m for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
            floats = [m for layer in layers for m in layer.modules() if isinstance(m, float8.Float8Linear)]
            if dtype == "fp8":
                assert engine.weights_dtype == float8.FP8 and not linears and len(floats) == 7 * len(layers)
            else:
                assert engine.weights_dtype == torch.float32 and not floats
            turns = [Turn.user("What is in the picture?", [make_png(96, 64, (200, 40, 40))])]
            request = InferenceRequest(f"fp8-{dtype}", turns, SamplingParams(max_new_tokens=24))
            events = [event async for event in executor.submit(request)]
            done = events[-1]
            assert isinstance(done, Done), done
            answers[dtype] = done.text
        finally:
            await executor.stop()
    assert answers["fp8"] and answers["fp8"] != answers["auto"]


def test_the_experts_benchmark_ranks_prefill_modes_where_the_engine_reads_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench/float8_experts.py --write-tiles ranks bf16, W8A16 and W8A8 at a prefill's rows (both
    routings summed) into float8_tiles.json, and `float8_gemm.prefill_modes` reads that ranking;
    the tiles of a skewed routing are kept only where they beat the rule's."""
    from bench import float8_experts
    from server.inference.model import float8_gemm

    monkeypatch.setattr(float8_gemm, "TILES_FILE", tmp_path / "tiles.json")
    float8_gemm._measured.cache_clear()
    monkeypatch.setattr(float8_experts, "EXPERTS", {"moe": (8, 2, 256, 64)})

    def result(bf16: float, w8a16: float, w8a8: float, rows: int) -> dict[str, Any]:
        def mode(ms: float, suffix: str) -> dict[str, Any]:
            keys = [float8_gemm.tile_key("gated" + suffix, 64, 256, rows // 4),
                    float8_gemm.tile_key("routed" + suffix, 256, 64, rows // 4)]  # fmt: skip
            return {"ms": 2 * ms, "best_ms": ms, "best_tiles": (64, 64, 128, 8, 3), "keys": keys}

        return {"bf16_ms": bf16, "w8a16": mode(w8a16, ""), "w8a8": mode(w8a8, " fp8")}

    report = {
        "moe/64/uniform": result(0.5, 0.25, 0.3, 64),
        "moe/64/skewed": result(0.2, 0.1, 0.15, 64),
        "moe/4096/uniform": result(1.2, 1.3, 0.7, 4096),
        "moe/4096/skewed": result(1.1, 1.2, 1.0, 4096),  # summed with uniform's: w8a8 first
    }
    try:
        float8_experts.write_tiles(report, "cpu")
        assert float8_gemm.prefill_modes(torch.device("cpu"), 256, 64) == ["w8a8", "bf16", "w8a16"]
        assert float8_gemm.prefill_modes(torch.device("cpu"), 2048, 768) == []  # not measured
        tiles = float8_gemm._tiles("gated fp8", 64, 256, 1024, torch.device("cpu"))
        assert tiles == float8_gemm.Tiles(64, 64, 128, 8, 3)
    finally:
        float8_gemm._measured.cache_clear()
