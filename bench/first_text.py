"""Which tokens does a random-weight checkpoint answer first, and from which one on is there text?

Greedy answers (128 tokens forced, as bench/serve.py asks) to three new 1024x1024 pictures and to
a text question, through the engine with its graphs: the index of the first token whose text the
detokenizer releases, and the first tokens with their own text. A client's TTFT counts from its
first text, so a checkpoint that opens with silent ids (see `mute_silent_ids`) would add decode
steps to it that a real model's answer does not have.

python bench/first_text.py --model 2b
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.architectures import load_in_memory
from bench.executor import noise_jpeg
from bench.serve_clients import QUESTION
from protocol.pictures import ImageLimits
from server.inference.api import SamplingParams, Turn
from server.inference.detok import IncrementalDetokenizer
from server.inference.engine import Sequence
from server.inference.model.demo import build_demo_model
from server.inference.model.model_engine import EngineOptions, ModelEngine
from server.inference.model.runner import ModelRunner


@torch.inference_mode()
def answer(engine: ModelEngine, picture: bytes | None, steps: int) -> None:
    pictures = [picture] if picture else []
    seq = Sequence(
        "a", engine.prepare([Turn.user(QUESTION, pictures)]), SamplingParams(128, min_new_tokens=128), 128
    )
    assert engine.reserve(seq)
    seq.tokens.extend(engine.prefill([seq]).tokens())
    for _ in range(steps - 1):
        seq.tokens.extend(engine.decode([seq]).tokens())
    detok = IncrementalDetokenizer(engine.detokenize)
    first = next((i for i, t in enumerate(seq.tokens) if detok.push(t)), None)
    print(
        f"picture={bool(picture)} first visible text at token {first}; tokens {seq.tokens[:24]}", flush=True
    )
    print("  pieces", [engine.detokenize([t]) for t in seq.tokens[:24]], flush=True)
    engine.release(seq)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="2b")
    args = parser.parse_args()
    demo = build_demo_model(Path(tempfile.mkdtemp()) / "demo")
    loaded = load_in_memory(args.model, demo)
    runner = ModelRunner(loaded, ImageLimits(max_pixels=1024 * 1024), 8192)
    engine = ModelEngine(runner, EngineOptions(max_batch=8, max_context_tokens=8192, vision_cache_bytes=0))
    engine.warm_up()
    for seed in (1, 2, 3):
        answer(engine, noise_jpeg(1024, seed), 64)
    answer(engine, None, 64)


if __name__ == "__main__":
    main()
