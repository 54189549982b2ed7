"""The vision encoder run with its grid-derived tensors computed on the CPU gives transformers'
own `get_image_features` output exactly (values, split per picture, deepstack levels)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from protocol.pictures import ImageLimits
from server.inference.api import Turn
from server.inference.model.model_engine import EngineOptions, ModelEngine
from server.inference.model.pixels import patches
from server.inference.model.vision import GRAPH_PICTURES, VisionEncoder
from tests.conftest import make_png


def noise_png(width: int, height: int, seed: int) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


@torch.inference_mode()
def test_precomputed_grid_tensors_give_the_stock_encoder_output_exactly(demo_model_dir: Path) -> None:
    options = EngineOptions(max_batch=2, max_context_tokens=4096, max_new_tokens=8)
    engine = ModelEngine.load(
        str(demo_model_dir), device="cpu", dtype="float32", limits=ImageLimits(), options=options
    )
    pictures = [noise_png(96, 64, 1), make_png(320, 200, (20, 200, 90)), noise_png(40, 400, 2)]
    prompt = engine.prepare([Turn.user("Compare them.", pictures)])
    batch = [p.picture for p in prompt.data.pictures]
    assert len(batch) == 3 and len({tuple(p.grid[0].tolist()) for p in batch}) == 3  # three shapes
    encoder = VisionEncoder(engine.model, 0)
    ours = encoder.encode(batch, engine.runner.device, engine.runner.dtype)
    assert encoder.precompute  # the precomputed path ran: it did not fall back to the stock one
    stock = engine.model.model.get_image_features(
        patches([p.decoded for p in batch], "cpu", torch.float32),
        torch.cat([p.grid for p in batch]),
        return_dict=True,
    )
    for number, encoded in enumerate(ours):
        assert torch.equal(encoded.embeds, stock.pooler_output[number])
        assert len(encoded.deepstack) == len(stock.deepstack_features) > 0
        for level, features in zip(encoded.deepstack, stock.deepstack_features, strict=True):
            assert torch.equal(level, features[number])


@torch.inference_mode()
def test_the_patch_embedding_as_one_gemm_equals_its_convolution(demo_model_dir: Path) -> None:
    from server.inference.model.loader import load_model
    from server.inference.model.vision import patch_embed_as_linear

    visual = load_model(str(demo_model_dir), "cpu", "float32").model.model.visual
    embed = visual.patch_embed
    kernel = embed.proj.kernel_size
    patches_in = torch.randn(37, embed.in_channels * kernel[0] * kernel[1] * kernel[2])
    stock = embed(patches_in)
    patch_embed_as_linear(visual)
    assert embed.forward is not type(embed).forward  # replaced
    torch.testing.assert_close(embed(patches_in), stock, rtol=1e-5, atol=1e-5)


def test_grid_inputs_are_computed_once_per_picture_size(demo_model_dir: Path) -> None:
    options = EngineOptions(max_batch=2, max_context_tokens=4096, max_new_tokens=8, vision_cache_bytes=0)
    engine = ModelEngine.load(
        str(demo_model_dir), device="cpu", dtype="float32", limits=ImageLimits(), options=options
    )
    same_size = [noise_png(96, 64, 3), noise_png(96, 64, 4), make_png(320, 200)]
    prompt = engine.prepare([Turn.user("Compare them.", same_size)])
    engine.vision.encode([p.picture for p in prompt.data.pictures], engine.runner.device, engine.runner.dtype)
    assert engine.vision.precompute
    assert len(engine.vision._grids) == 2  # two sizes among three pictures
    assert all(
        {"position_ids", "interp_indices", "interp_weights"} <= set(e) for e in engine.vision._grids.values()
    )


@torch.inference_mode()
def test_one_varlen_attention_call_per_layer_gives_the_stock_encoder_output(
    demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA the encoder's attention runs as one variable-length call per layer for all its pictures
    (flash.py; FlashAttention 4 on an H200). The route through transformers (the registered attention
    function, the offsets passed in, the output's layout) is checked here with a CPU stand-in for the
    kernel that records its calls: same output as the stock encoder, which calls SDPA per picture."""
    from server.inference.model import vision
    from server.inference.model.flash import attention_by_rows

    calls: list[tuple[list[int], int]] = []

    def rows(q, k, v, cu_q, cu_k, max_q, max_k):  # type: ignore[no-untyped-def]
        calls.append((cu_q.tolist(), max_q))
        return attention_by_rows(q, k, v, cu_q.tolist(), cu_k.tolist(), q.shape[-1] ** -0.5, causal=False)

    monkeypatch.setattr(vision, "varlen_attention", lambda *a, **k: ("CPU stand-in", rows))
    options = EngineOptions(max_batch=2, max_context_tokens=4096, max_new_tokens=8, vision_cache_bytes=0)
    engine = ModelEngine.load(
        str(demo_model_dir), device="cpu", dtype="float32", limits=ImageLimits(), options=options
    )
    prompt = engine.prepare([Turn.user("Compare them.", [noise_png(96, 64, 5), noise_png(40, 400, 6)])])
    batch = [p.picture for p in prompt.data.pictures]
    stock = engine.model.model.get_image_features(
        patches([p.decoded for p in batch], "cpu", torch.float32),
        torch.cat([p.grid for p in batch]),
        return_dict=True,
    )
    assert engine.model.model.visual.config._attn_implementation == vision.VARLEN_ATTENTION
    calls.clear()
    ours = engine.vision.encode(batch, engine.runner.device, engine.runner.dtype)
    sizes = [int(p.grid.prod()) for p in batch]
    assert calls and all(call == ([0, sizes[0], sum(sizes)], max(sizes)) for call in calls)
    assert len(calls) == len(engine.model.model.visual.blocks)  # one call per layer, not per picture
    for number, encoded in enumerate(ours):
        torch.testing.assert_close(encoded.embeds, stock.pooler_output[number], rtol=1e-4, atol=1e-4)


class _Replay:
    """A CPU stand-in for a captured CUDA graph: replaying runs the padded forward it stands for."""

    def __init__(self, graphs: Any, key: int, spoil: bool) -> None:
        self.graphs, self.key, self.spoil = graphs, key, spoil

    def replay(self) -> None:
        self.graphs._forward(self.key)
        if self.spoil:  # a graph that computed something else
            self.graphs._out.add_(1.0)


def _engine_with_graphs(demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch, spoil: bool = False) -> Any:
    """The demo engine on the CPU with the vision encoder's graph path on: the varlen attention by a
    CPU stand-in and graph capture by `_Replay` (a CUDA graph needs a GPU; all else is the real code:
    buckets, static buffers, the padding segment, the check against the eager encoder)."""
    from server.inference.model import vision
    from server.inference.model.flash import attention_by_rows
    from server.inference.model.vision_graphs import VisionGraphs

    calls: list[tuple[list[int], int]] = []

    def rows(q, k, v, cu_q, cu_k, max_q, max_k):  # type: ignore[no-untyped-def]
        calls.append((cu_q.tolist(), max_q))
        return attention_by_rows(q, k, v, cu_q.tolist(), cu_k.tolist(), q.shape[-1] ** -0.5, causal=False)

    monkeypatch.setattr(vision, "varlen_attention", lambda *a, **k: ("CPU stand-in", rows))
    monkeypatch.setattr(VisionGraphs, "_record", lambda self, key: _Replay(self, key, spoil))
    options = EngineOptions(max_batch=2, max_context_tokens=4096, max_new_tokens=8, vision_cache_bytes=0)
    engine = ModelEngine.load(
        str(demo_model_dir), device="cpu", dtype="float32", limits=ImageLimits(), options=options
    )
    engine.vision.graphs.enabled = True  # as on CUDA
    engine.vision.graphs.limit = vision.GRAPH_PATCHES
    engine.calls = calls
    return engine


def _stock_and_ours(engine: Any, pngs: list[bytes]) -> tuple[Any, list[Any], list[int]]:
    prompt = engine.prepare([Turn.user("Compare them.", pngs)])
    batch = [p.picture for p in prompt.data.pictures]
    stock = engine.model.model.get_image_features(
        patches([p.decoded for p in batch], "cpu", torch.float32),
        torch.cat([p.grid for p in batch]),
        return_dict=True,
    )
    ours = engine.vision.encode(batch, engine.runner.device, engine.runner.dtype)
    return stock, ours, [int(p.grid.prod()) for p in batch]


@torch.inference_mode()
def test_vision_graphs_pad_batches_into_a_segment_of_their_own(
    demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine_with_graphs(demo_model_dir, monkeypatch)
    graphs = engine.vision.graphs
    # The first batch of a size captures its graph and checks it; the next one of that size replays it.
    for pngs in (
        [noise_png(96, 64, 7), noise_png(40, 400, 8)],
        [noise_png(40, 400, 9), noise_png(64, 96, 10)],
    ):
        engine.calls.clear()
        stock, ours, sizes = _stock_and_ours(engine, pngs)
        # The padding up to the bucket is a segment of its own; empty ones fill the fixed count.
        padded = [0, sizes[0], sum(sizes)] + [1024] * (GRAPH_PICTURES + 2 - 3)
        assert (padded, 1024) in engine.calls, engine.calls
        for number, encoded in enumerate(ours):
            torch.testing.assert_close(encoded.embeds, stock.pooler_output[number], rtol=1e-4, atol=1e-4)
            for level, features in zip(encoded.deepstack, stock.deepstack_features, strict=True):
                torch.testing.assert_close(level, features[number], rtol=1e-4, atol=1e-4)
    assert list(graphs._graphs) == [1024] and graphs.enabled
    # More pictures than a graph takes: encoded eagerly, no graph.
    stock, ours, _ = _stock_and_ours(engine, [noise_png(32, 32, s) for s in range(GRAPH_PICTURES + 1)])
    assert list(graphs._graphs) == [1024]
    torch.testing.assert_close(ours[-1].embeds, stock.pooler_output[-1], rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_vision_graphs_are_captured_at_warm_up_for_every_padded_size(
    demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine_with_graphs(demo_model_dir, monkeypatch)
    graphs = engine.vision.graphs
    graphs.limit = 3 * 1024
    assert engine.vision.warm_up_graphs(engine.runner.device, engine.runner.dtype) == 3
    assert sorted(graphs._graphs) == [1024, 2048, 3072] and graphs.enabled
    engine.calls.clear()
    pngs = [noise_png(400, 200, seed) for seed in range(12, 16)]
    stock, ours, sizes = _stock_and_ours(engine, pngs)  # over 1024 patches: the 2048 graph
    assert sum(sizes) > 1024 and sorted(graphs._graphs) == [1024, 2048, 3072]  # replayed, none captured
    assert any(max_q == 2048 for _, max_q in engine.calls), engine.calls  # (the stock run: the rest)
    for number, encoded in enumerate(ours):
        torch.testing.assert_close(encoded.embeds, stock.pooler_output[number], rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_a_vision_graph_that_disagrees_with_the_encoder_turns_graphs_off(
    demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine_with_graphs(demo_model_dir, monkeypatch, spoil=True)
    stock, ours, _ = _stock_and_ours(engine, [noise_png(96, 64, 11)])
    assert not engine.vision.graphs.enabled and not engine.vision.graphs._graphs
    torch.testing.assert_close(ours[0].embeds, stock.pooler_output[0], rtol=1e-4, atol=1e-4)  # the eager one
