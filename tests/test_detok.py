from __future__ import annotations

import random
from pathlib import Path

import pytest

from server.inference.detok import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_dir)


def stream(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], IncrementalDetokenizer]:  # type: ignore[no-untyped-def]
    detok = IncrementalDetokenizer(lambda t: tokenizer.decode(t, skip_special_tokens=True), stop)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.finish())
    return pieces, detok


def test_multibyte_characters_never_split(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = "Hello 这张图片里有什么？ 😀🐱 world — done"
    pieces, detok = stream(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])
    assert "".join(pieces) == text == detok.text
    assert all("\ufffd" not in piece for piece in pieces)


def test_random_token_streams_concatenate_to_the_full_decode(tokenizer) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(7)
    for _ in range(100):
        ids = [rng.randrange(0, len(tokenizer)) for _ in range(rng.randrange(1, 40))]
        pieces, _ = stream(tokenizer, ids)
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_string_cuts_and_is_never_released(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer("The answer is 42. STOP and more text", add_special_tokens=False)["input_ids"]
    pieces, detok = stream(tokenizer, ids, ("STOP",))
    assert detok.stopped
    assert "".join(pieces) == "The answer is 42. "
    assert not any("ST" in piece for piece in pieces)
