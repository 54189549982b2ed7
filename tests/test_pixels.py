"""Picture patches made by the engine (`pixels.patches`) against the image processor's own.

The preparation threads used to run the checkpoint's image processor; now they only decode,
and resize, normalize and patchify happen on the model's device. Same grids always; the same
values where no resize is needed; within a uint8 level of rounding where one is (the two
resize in two passes rounded to uint8, and clip the cubic's overshoot between them: on noise
that may differ more where the passes' order does). Greedy answers are the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from protocol.pictures import ImageLimits
from server.inference.api import SamplingParams, Turn
from server.inference.images import decode_image
from server.inference.model.loader import LoadedModel, load_model
from server.inference.model.pixels import Decoded, PixelSpec, patches
from server.inference.model.runner import ModelRunner
from tests.conftest import make_png

LEVEL = 1 / 255 / 0.5  # one uint8 level after the demo processor's normalization (std 0.5)

# (width, height, max_pixels): kept as they are, shrunk, grown to the minimum, thin, wide
SIZES = [
    (64, 64, 2**20),
    (96, 64, 2**20),
    (1024, 1024, 2**20),
    (100, 75, 2**20),
    (320, 200, 2**20),
    (40, 400, 2**20),
    (1000, 37, 2**20),
    (33, 33, 2**20),
    (1280, 720, 2**20),
    (500, 300, 128 * 128),
    (2000, 1500, 2**20),
]


@pytest.fixture(scope="module")
def loaded(demo_model_dir: Path) -> LoadedModel:
    return load_model(str(demo_model_dir), "cpu", "float32")


def _pictures(width: int, height: int, seed: int) -> dict[str, Image.Image]:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    return {
        "noise": Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)),
        "smooth": Image.fromarray(smooth.astype(np.uint8)),
    }


def _processor(loaded: LoadedModel, images: list[Image.Image], spec: PixelSpec) -> Any:
    size = {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
    return loaded.image_processor(images=images, size=size, return_tensors="pt")


@pytest.mark.parametrize(("width", "height", "max_pixels"), SIZES)
def test_patches_are_the_image_processors(
    loaded: LoadedModel, width: int, height: int, max_pixels: int
) -> None:
    spec = PixelSpec.of(loaded.image_processor, max_pixels)
    for kind, image in _pictures(width, height, seed=width * height).items():
        reference = _processor(loaded, [image], spec)
        decoded = Decoded.of(image, spec)
        ours = patches([decoded], "cpu", torch.float32)
        assert torch.equal(decoded.grid, reference["image_grid_thw"])
        assert ours.shape == reference["pixel_values"].shape
        difference = (ours - reference["pixel_values"]).abs()
        if decoded.size == (height, width):  # no resize: the same arithmetic
            assert difference.max().item() < 1e-5, kind
            continue
        assert difference.mean().item() < LEVEL / 2, (kind, difference.mean().item())
        if kind == "smooth":
            assert difference.max().item() <= LEVEL * 1.01, difference.max().item()


def test_a_batch_of_mixed_sizes_is_each_picture_in_order_in_the_model_dtype(loaded: LoadedModel) -> None:
    spec = PixelSpec.of(loaded.image_processor, 2**20)
    images = [_pictures(w, h, seed=n)["smooth"] for n, (w, h, _) in enumerate(SIZES[:6])]
    reference = _processor(loaded, images, spec)
    decoded = [Decoded.of(image, spec) for image in images]
    batch = patches(decoded, "cpu", torch.bfloat16)
    assert batch.dtype == torch.bfloat16
    assert torch.equal(torch.cat([d.grid for d in decoded]), reference["image_grid_thw"])
    # bf16 of the same float32 values: the processor's values rounded once, as before
    alone = torch.cat([patches([d], "cpu", torch.float32) for d in decoded]).to(torch.bfloat16)
    assert torch.equal(batch, alone)
    error = (batch.float() - reference["pixel_values"]).abs().max().item()
    assert error <= LEVEL * 1.01 + 2**-8, error  # a level of resize rounding plus bf16's


def test_greedy_answers_are_those_of_the_image_processors_pixels(loaded: LoadedModel) -> None:
    """Stock `generate` fed by the processor (the former preparation) and by the engine's
    patches (`ModelRunner.model_inputs`) gives the same tokens; tests/test_executor.py checks
    the executor against the latter."""
    runner = ModelRunner(loaded, ImageLimits(), 4096)
    convs = [
        [Turn.user("What is in this picture?", [make_png(96, 64, (200, 40, 40))])],
        [Turn.user("Describe it.", [make_png(320, 200, (20, 200, 90))])],
        [Turn.user("Two pictures: compare them.", [make_png(100, 75), make_png(128, 300, (0, 0, 250))])],
        [Turn.user("A tall one", [make_png(40, 400, (90, 90, 90))])],
    ]
    params = SamplingParams(max_new_tokens=24)
    ours = runner.generate_reference(convs, params)
    prompts = [runner.prompts.build(turns) for turns in convs]
    inputs = runner.model_inputs(prompts)
    spec = runner.prompts.spec
    images = [
        decode_image(data, runner.prompts.limits) for turns in convs for t in turns for data in t.images
    ]
    former = _processor(loaded, images, spec)
    assert torch.equal(former["image_grid_thw"], inputs["image_grid_thw"])
    inputs["pixel_values"] = former["pixel_values"].to(runner.dtype)
    with torch.inference_mode():
        out = runner.model.generate(
            **inputs,
            max_new_tokens=24,
            do_sample=False,
            pad_token_id=runner.pad_token_id,
            eos_token_id=sorted(runner.eos_token_ids),
        )
    width = inputs["input_ids"].shape[1]
    eos = runner.eos_token_ids
    rows = out[:, width:].tolist()
    theirs = [row[: next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in rows]
    assert ours == theirs
