"""The vision encoder run with its grid-derived tensors computed on the CPU gives transformers'
own `get_image_features` output exactly (values, split per picture, deepstack levels)."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image

from protocol.pictures import ImageLimits
from server.inference.api import Turn
from server.inference.model.model_engine import EngineOptions, ModelEngine
from server.inference.model.pixels import patches
from server.inference.model.vision import VisionEncoder
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
