"""PromptBuilder: dropping the oldest turns to fit the context, in near-linear time."""

from __future__ import annotations

import time
import types
from pathlib import Path

import pytest
import torch

from protocol.pictures import ImageLimits
from server.errors import Cancelled, TooLarge
from server.inference.api import Turn
from server.inference.engine import keep_going
from server.inference.model.loader import load_model
from server.inference.model.prompt import Prompt, PromptBuilder
from tests.conftest import make_png


@pytest.fixture(scope="module")
def builder(demo_model_dir: Path) -> PromptBuilder:
    return PromptBuilder(load_model(str(demo_model_dir), "cpu", "float32"), ImageLimits(), 4096)


def _quadratic(builder: PromptBuilder, turns: list[Turn]) -> Prompt:
    """The builder's former algorithm, kept as the reference: drop one exchange, rebuild it all."""
    turns = list(turns)
    while True:
        attempt = builder._build(turns, builder._pictures(turns, keep_going))
        if isinstance(attempt, Prompt):
            return attempt
        first_user = next((i for i, t in enumerate(turns) if t.role == "user"), len(turns))
        if len(turns) - first_user <= 1:
            raise attempt
        del turns[first_user]
        while first_user < len(turns) - 1 and turns[first_user].role == "assistant":
            del turns[first_user]


def _conversation() -> list[Turn]:
    turns = [Turn("system", "you look at pictures")]
    for n in range(12):
        pictures = [make_png(64 + 32 * (n % 3), 64, (n * 20, 90, 30))] if n % 4 == 1 else []
        turns.append(Turn.user(f"question {n} " + "word " * (n % 5), pictures))
        turns.append(Turn.assistant(f"answer {n} " + "more " * n))
        if n == 6:
            turns.append(Turn("system", "be brief"))
    turns.append(Turn.user("and the last one?", [make_png(96, 64)]))
    return turns


@pytest.mark.parametrize("limit", [40, 60, 90, 130, 180, 240, 300, 400, 5000])
def test_dropping_keeps_the_newest_turns_exactly_as_before(builder: PromptBuilder, limit: int) -> None:
    builder.max_context_tokens = limit
    try:
        expected: Prompt | TooLarge = _quadratic(builder, _conversation())
    except TooLarge as exc:
        expected = exc
    try:
        got: Prompt | TooLarge = builder.build(_conversation())
    except TooLarge as exc:
        got = exc
    builder.max_context_tokens = 4096
    if isinstance(expected, TooLarge):
        assert isinstance(got, TooLarge) and got.message == expected.message
        return
    assert isinstance(got, Prompt)
    assert got.input_ids == expected.input_ids
    assert got.image_tokens == expected.image_tokens
    if expected.image_grid_thw is None:
        assert got.pixel_values() is None and got.image_grid_thw is None
    else:
        assert got.image_grid_thw is not None
        assert torch.equal(got.pixel_values(), expected.pixel_values())
        assert torch.equal(got.image_grid_thw, expected.image_grid_thw)


def test_ten_thousand_turns_are_cut_down_in_seconds(builder: PromptBuilder) -> None:
    turns = [Turn.user("hello") if n % 2 == 0 else Turn.assistant("hi") for n in range(10_001)]
    started = time.monotonic()
    prompt = builder.build(turns)
    elapsed = time.monotonic() - started
    assert len(prompt) <= builder.max_context_tokens
    assert elapsed < 20, f"{elapsed:.1f} s"  # the former builder took minutes


def test_a_check_that_raises_stops_the_work(builder: PromptBuilder) -> None:
    calls = 0

    def check() -> None:
        nonlocal calls
        calls += 1
        if calls > 2:
            raise Cancelled("cancelled")

    turns = [Turn.user("hello") if n % 2 == 0 else Turn.assistant("hi") for n in range(10_001)]
    with pytest.raises(Cancelled):
        builder.build(turns, check)
    assert calls == 3


def test_a_follow_up_takes_its_pictures_from_the_cache_with_the_same_values(demo_model_dir: Path) -> None:
    loaded = load_model(str(demo_model_dir), "cpu", "float32")
    cached = PromptBuilder(loaded, ImageLimits(), 4096)
    uncached = PromptBuilder(loaded, ImageLimits(), 4096, picture_cache_bytes=0)
    red, blue = make_png(96, 64, (200, 40, 40)), make_png(64, 128, (40, 40, 200))
    first = [Turn.user("What is this?", [red, blue])]
    follow_up = [*first, Turn.assistant("Two boxes."), Turn.user("And this?", [red]), Turn.user("Why?")]
    cached.build(first)
    assert cached.picture_hits == 0
    for turns in (first, follow_up):
        ours, reference = cached.build(turns), uncached.build(turns)
        assert ours.input_ids == reference.input_ids
        assert ours.image_grid_thw is not None and reference.image_grid_thw is not None
        assert torch.equal(ours.image_grid_thw, reference.image_grid_thw)
        assert torch.equal(ours.pixel_values(), reference.pixel_values())
    assert cached.picture_hits == 2 + 3  # the first question again, then the follow-up's three
    assert uncached.picture_hits == 0


def test_the_picture_cache_keeps_the_most_recent_within_its_budget(demo_model_dir: Path) -> None:
    loaded = load_model(str(demo_model_dir), "cpu", "float32")
    one = PromptBuilder(loaded, ImageLimits(), 4096)
    red, blue = make_png(96, 64, (200, 40, 40)), make_png(96, 64, (40, 40, 200))
    pictures = one.build([Turn.user("?", [red])]).pictures
    one.picture_cache_bytes = pictures[0].nbytes  # room for one picture of this size
    one.build([Turn.user("?", [blue])])  # evicts red
    one.build([Turn.user("?", [blue])])
    assert one.picture_hits == 1
    one.build([Turn.user("?", [red])])
    assert one.picture_hits == 1


def _tokenized_whole(builder: PromptBuilder, turns: list[Turn]) -> list[int]:
    """The prompt's ids the plain way: the chat template's text with each picture's pads written
    out, tokenized in one piece."""
    splice, builder.splice = builder.splice, False
    try:
        whole = builder.build(turns)
    finally:
        builder.splice = splice
    return whole.input_ids


@pytest.mark.parametrize(
    "turns",
    [
        _conversation(),
        [Turn.user("", [make_png(96, 64), make_png(64, 96)])],  # pictures side by side, no text
        [Turn.user(" leading space, then\n\na picture ", [make_png()]), Turn.assistant("Ünïcode 文字 ok")],
        [Turn("system", "<|vision_end|> typed by hand"), Turn.user("?!", [make_png(128, 32)])],
    ],
)
def test_spliced_pad_ids_equal_tokenizing_the_whole_text(builder: PromptBuilder, turns: list[Turn]) -> None:
    assert builder.splice  # the demo checkpoint's pad is a special token, like Qwen3-VL's
    prompt = builder.build(turns)
    assert prompt.input_ids == _tokenized_whole(builder, turns)
    assert prompt.input_ids.count(builder.image_token_id) == prompt.image_tokens > 0


def test_a_follow_up_hashes_the_pictures_it_carries_again_only_once(
    demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.inference.model import prompt as prompt_module

    hashed: list[int] = []
    blake2b = prompt_module.hashlib.blake2b

    def counting(data: bytes, digest_size: int) -> object:
        hashed.append(len(data))
        return blake2b(data, digest_size=digest_size)

    monkeypatch.setattr(prompt_module, "hashlib", types.SimpleNamespace(blake2b=counting))
    one = PromptBuilder(load_model(str(demo_model_dir), "cpu", "float32"), ImageLimits(), 4096)
    red = make_png(96, 64, (200, 40, 40))
    first = [Turn.user("What is this?", [red])]
    follow_up = [*first, Turn.assistant("A box."), Turn.user("Which colour?")]
    one.build(first)
    one.build(follow_up)
    assert hashed == [len(red)]  # the history's own bytes object: its hash is known
    same_content = bytes(bytearray(red))  # another object (e.g. sent again over the OpenAI API)
    again = one.build([Turn.user("What is this?", [same_content])])
    assert len(hashed) == 2 and one.picture_hits == 2  # hashed again, and found decoded by that hash
    assert again.input_ids == one.build(first).input_ids
    blue = make_png(64, 96, (40, 40, 200))
    monkeypatch.setattr(prompt_module, "DIGEST_CACHE_BYTES", max(len(red), len(blue)))  # room for one
    one.build([Turn.user("?", [blue])])  # evicts the oldest kept
    one.build(first)
    assert len(hashed) == 4
