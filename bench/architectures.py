"""Real Qwen3-VL architectures (from the published configs) for random-weight benchmarks.

No weights are downloaded: `build_checkpoint` instantiates the architecture with random
weights and saves it with the demo model's image processor and a tokenizer widened to the
model's whole vocabulary (`full_vocab_tokenizer`), so the service loads it through its
normal path. Answers are meaningless; shapes, memory traffic and kernels are the real ones,
and every sampled id decodes to a word (`mute_silent_ids`), so answers stream as a real model's do.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

VISION_2B = {
    "depth": 24,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_heads": 16,
    "out_hidden_size": 2048,
    "deepstack_visual_indexes": [5, 11, 17],
}
VISION_8B = {
    "depth": 27,
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_heads": 16,
    "out_hidden_size": 4096,
    "deepstack_visual_indexes": [8, 16, 24],
}
ROPE = {
    "rope_type": "default",
    "rope_theta": 5_000_000.0,
    "mrope_section": [24, 20, 20],
    "mrope_interleaved": True,
}
COMMON_TEXT = {
    "vocab_size": 151936,
    "head_dim": 128,
    "max_position_embeddings": 262144,
    "rope_parameters": ROPE,
    "rms_norm_eps": 1e-6,
}

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "2b": {
        "model_type": "qwen3_vl",
        "text_config": {
            **COMMON_TEXT,
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
        },
        "vision_config": VISION_2B,
        "tie_word_embeddings": True,
    },
    "8b": {
        "model_type": "qwen3_vl",
        "text_config": {
            **COMMON_TEXT,
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
        },
        "vision_config": VISION_8B,
        "tie_word_embeddings": False,
    },
    "30b-a3b": {
        "model_type": "qwen3_vl_moe",
        "text_config": {
            **COMMON_TEXT,
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "num_hidden_layers": 48,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "moe_intermediate_size": 768,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "decoder_sparse_step": 1,
            "norm_topk_prob": True,
        },
        "vision_config": {**VISION_8B, "out_hidden_size": 2048},
        "tie_word_embeddings": False,
    },
}


def _filler_words(count: int) -> list[str]:
    """*count* distinct pronounceable words ("ba", "keto", ...), shortest first."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    syllables = [c + v for c in consonants for v in vowels]  # 70
    words: list[str] = []
    layer = [""]
    while len(words) < count:
        layer = [w + s for w in layer for s in syllables]
        words.extend(layer[: count - len(words)])
    return words


def full_vocab_tokenizer(demo_dir: Path, target: Path, vocab_size: int) -> None:
    """Write the demo tokenizer into *target*, its vocabulary filled up to *vocab_size* ids.

    The demo tokenizer has a few hundred ids; a random-weight model samples from all of
    `vocab_size`, and ids the tokenizer does not know decode to nothing, so an answer would
    arrive as one piece at the end. Each added id is a word " word" (an added token: decoding
    gives the word, and encoding the decoded text gives the same ids back, as a real model's
    answers do when the next turn repeats them: the prefix cache can then reuse the answer's
    keys and values, and a follow-up prefills its new question only). The special tokens keep
    their ids, so prompts tokenize exactly as with the demo tokenizer.
    """
    for file in demo_dir.iterdir():
        if file.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(file, target / file.name)
    data = json.loads((demo_dir / "tokenizer.json").read_text())
    added: list[dict[str, Any]] = data["added_tokens"]
    start = max(max(data["model"]["vocab"].values()), *(token["id"] for token in added)) + 1
    flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": False}
    for token_id, word in zip(range(start, vocab_size), _filler_words(vocab_size), strict=False):
        added.append({"id": token_id, "content": f" {word}", **flags})
    (target / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))


def silent_ids(tokenizer_dir: Path) -> list[int]:
    """Ids of the tokenizer in *tokenizer_dir* that decode to no text of their own: special
    tokens (skipped when an answer is decoded) and lone bytes of multi-byte characters (U+FFFD
    until the character's other bytes follow)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    pieces = ((i, tokenizer.decode([i], skip_special_tokens=True)) for i in range(len(tokenizer)))
    return [i for i, piece in pieces if not piece or "\ufffd" in piece]


def mute_silent_ids(model: Any, demo_dir: Path) -> None:
    """Zero the output rows (lm_head) of the demo tokenizer's silent ids, so a random-weight
    model never samples them: their logit is exactly 0 while the others' are random, and the
    largest of ~150,000 of those is well above 0.

    Measured on an H200 (`bench/first_text.py`, 2026-12-02): the random 2B answered every
    1024x1024 picture question with one lone byte (id 156) 29-33 times before its first word, so
    the client's first text came ~30 decode steps after the first token (~260 ms of a
    WebSocket client's TTFT at c=32, ~80 ms at c=1), which no real model's answer does; its
    text follow-ups started with words. 2B ties its embeddings to the lm_head: there the same
    ids' input embeddings are zero too (special tokens and lone bytes of the prompt enter as
    zero vectors), which changes no shape and no cost."""
    import torch

    with torch.no_grad():
        model.lm_head.weight[silent_ids(demo_dir)] = 0


def build_model(name: str, demo_dir: Path, dtype: str = "bfloat16") -> Any:
    """Architecture *name* with random weights, on the GPU, using the demo tokenizer's special ids."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.initialization import no_init_weights

    spec = json.loads(json.dumps(ARCHITECTURES[name]))
    tokenizer_meta = json.loads((demo_dir / "config.json").read_text())
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        spec[key] = tokenizer_meta[key]  # the demo tokenizer's ids for the special tokens
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, **spec)
    with torch.device("cuda"), no_init_weights():
        model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, dtype))
    with torch.no_grad():
        generator = torch.Generator(device="cuda").manual_seed(0)
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.02, generator=generator)
            else:
                param.fill_(1.0)
    mute_silent_ids(model, demo_dir)
    model.generation_config.eos_token_id = tokenizer_meta.get("eos_token_id")
    return model.eval()


def build_checkpoint(name: str, target: Path, demo_dir: Path, dtype: str = "bfloat16") -> float:
    """Write a random-weight checkpoint of architecture *name* to *target*; seconds taken."""
    import torch

    started = time.monotonic()
    model = build_model(name, demo_dir, dtype)
    model.save_pretrained(target)
    shutil.copy(demo_dir / "preprocessor_config.json", target / "preprocessor_config.json")
    full_vocab_tokenizer(demo_dir, target, model.config.text_config.vocab_size)
    (target / "vlbridge-bench.json").write_text(json.dumps({"architecture": name, "weights": "random"}))
    del model
    torch.cuda.empty_cache()
    return time.monotonic() - started


def load_in_memory(name: str, demo_dir: Path, dtype: str = "bfloat16") -> Any:
    """A LoadedModel whose weights never touch the disk (30B-A3B: 58 GiB would not fit there)."""
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer

    from server.inference.model.loader import LoadedModel

    model = build_model(name, demo_dir, dtype)
    words = demo_dir.parent / f"{demo_dir.name}-full-vocab"
    words.mkdir(exist_ok=True)
    full_vocab_tokenizer(demo_dir, words, model.config.text_config.vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(words)
    return LoadedModel(
        model,
        tokenizer,
        AutoImageProcessor.from_pretrained(demo_dir),
        tokenizer.chat_template,
        torch.device("cuda"),
        getattr(torch, dtype),
        f"{name} (random, in memory)",
    )
