"""M-RoPE positions (server/inference/model/positions.py) equal transformers' `get_rope_index`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from protocol.pictures import ImageLimits
from server.inference.api import Turn
from server.inference.model.loader import load_model
from server.inference.model.positions import mrope_positions
from server.inference.model.prompt import PromptBuilder
from tests.conftest import make_png


@pytest.fixture(scope="module")
def loaded(demo_model_dir: Path):  # type: ignore[no-untyped-def]
    return load_model(str(demo_model_dir), "cpu", "float32")


RED, WIDE, TALL = make_png(320, 256), make_png(480, 96, (20, 200, 90)), make_png(64, 400, (90, 20, 200))


@pytest.mark.parametrize(
    "turns",
    [
        [Turn.user("no picture at all")],
        [Turn.user("one", [RED])],
        [Turn.user("two of other shapes", [WIDE, TALL])],
        [Turn.user("the same twice", [RED]), Turn.assistant("ok"), Turn.user("again", [RED, WIDE])],
        [Turn.user("", [TALL])],
    ],
    ids=["text", "one", "two-shapes", "same-twice", "picture-only"],
)
def test_positions_equal_transformers(loaded, turns: list[Turn]) -> None:  # type: ignore[no-untyped-def]
    builder = PromptBuilder(loaded, ImageLimits(), 4096)
    prompt = builder.build(turns)
    grid = prompt.image_grid_thw.tolist() if prompt.image_grid_thw is not None else []
    merge = loaded.model.config.vision_config.spatial_merge_size
    ours, following = mrope_positions(prompt.input_ids, builder.image_token_id, grid, merge)
    ids = torch.tensor([prompt.input_ids])
    expected, deltas = loaded.model.model.get_rope_index(
        ids, mm_token_type_ids=(ids == builder.image_token_id).int(), image_grid_thw=prompt.image_grid_thw
    )
    assert ours.tolist() == expected[:, 0].tolist()
    assert following == len(prompt) + int(deltas[0, 0])


def test_a_grid_that_does_not_match_the_tokens_is_refused(loaded) -> None:  # type: ignore[no-untyped-def]
    builder = PromptBuilder(loaded, ImageLimits(), 4096)
    prompt = builder.build([Turn.user("one", [RED])])
    t, h, w = prompt.image_grid_thw.tolist()[0]
    merge = loaded.model.config.vision_config.spatial_merge_size
    for grid in [(t, h + 2 * merge, w), (t, h - 2 * merge, w), (t, h * 50, w)]:
        with pytest.raises(ValueError, match="does not match"):
            mrope_positions(prompt.input_ids, builder.image_token_id, [grid], merge)
    with pytest.raises(ValueError, match="expected 2 pictures"):
        mrope_positions(prompt.input_ids, builder.image_token_id, [(t, h, w)] * 2, merge)
