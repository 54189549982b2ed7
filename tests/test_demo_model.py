"""The demo checkpoint loads through the real loader and answers about a real PIL image."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from protocol.pictures import ImageLimits
from server.inference.api import SamplingParams, Turn
from server.inference.model.demo import is_demo_model
from server.inference.model.runner import ModelRunner


def test_demo_checkpoint_has_the_real_layout(demo_model_dir: Path) -> None:
    assert is_demo_model(demo_model_dir)
    config = json.loads((demo_model_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert (demo_model_dir / "preprocessor_config.json").exists()
    assert (demo_model_dir / "tokenizer.json").exists()
    size = sum(f.stat().st_size for f in demo_model_dir.iterdir())
    assert size < 20_000_000


def test_demo_model_generates_from_a_pil_image(demo_model_dir: Path) -> None:
    runner = ModelRunner.load(
        str(demo_model_dir), device="cpu", dtype="float32", limits=ImageLimits(), max_context_tokens=4096
    )
    image = Image.linear_gradient("L").convert("RGB").resize((160, 96))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG")
    prompt = runner.prompts.build([Turn.user("What is in this picture?", [buffer.getvalue()])])
    assert prompt.image_tokens == (96 // 32) * (160 // 32)
    assert prompt.input_ids.count(runner.model.config.image_token_id) == prompt.image_tokens
    [tokens] = runner.generate_reference(
        [[Turn.user("What is in this picture?", [buffer.getvalue()])]], SamplingParams(max_new_tokens=12)
    )
    assert 1 <= len(tokens) <= 12
    assert isinstance(runner.tokenizer.decode(tokens), str)


def test_the_engines_detokenizer_gives_the_tokenizers_text(demo_model_dir: Path) -> None:
    from server.inference.model.model_engine import EngineOptions, ModelEngine

    runner = ModelRunner.load(
        str(demo_model_dir), device="cpu", dtype="float32", limits=ImageLimits(), max_context_tokens=4096
    )
    engine = ModelEngine(runner, EngineOptions(max_batch=2, max_context_tokens=512, max_new_tokens=16))
    tokenizer = runner.tokenizer
    special = sorted(tokenizer.all_special_ids)
    text_ids = tokenizer("Ünïcode 文字 and plain words, 12.5%!")["input_ids"]
    windows = [text_ids, special + text_ids[:3], [text_ids[0], *special, *text_ids[1:]], [], text_ids[2:5]]
    windows += [list(range(n, n + 6)) for n in range(0, len(tokenizer), 37)]
    for ids in windows:
        assert engine.detokenize(ids) == tokenizer.decode(ids, skip_special_tokens=True), ids
