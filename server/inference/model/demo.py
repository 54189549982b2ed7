"""Build a tiny Qwen3-VL checkpoint entirely offline, in seconds.

The checkpoint has the real architecture (Qwen3VLForConditionalGeneration, M-RoPE,
deepstack, spatial merge) at toy width, random weights, a byte-level BPE tokenizer
trained here on local text with Qwen's special tokens, the Qwen2-VL image processor
config and a Qwen3-VL style chat template. It answers gibberish, but it is loaded and
served through exactly the code path a real checkpoint uses, so it exercises loading,
preprocessing, batching and streaming in tests and on machines without the real weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("vlbridge.model.demo")

DEMO_MARKER = "vlbridge-demo-model"
DEMO_VERSION = 1

# Qwen's special tokens, in the order (and so with the relative ids) Qwen ships them.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The shape of Qwen3-VL's own template: ChatML, pictures as vision_start/image_pad/vision_end.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)

_CORPUS = """
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
What is in this picture? Describe the image in detail. There is a cat sitting on a red sofa.
The screenshot shows an error message in a terminal window. The chart shows sales rising each month.
这张图片里有什么？请描述这张图片。图中有一只猫坐在红色的沙发上。截图显示了一个错误信息。
排队中，前面还有几个请求。模型正在生成回答。这是一个演示模型，回答是随机的。
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000, punctuation . , ; : ! ? ( ) [ ] { } " ' - _ / \\ @ # % & *
Emoji and symbols: ✓ ✗ → ← ★ ☆ ♥ 😀 🐱 📷 — … « » ° € £ ¥
"""


def _text_config() -> dict[str, object]:
    return {
        "vocab_size": 0,  # filled in from the tokenizer
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        # Qwen3-VL's [24, 20, 20] for head_dim 128, scaled to head_dim 32 (sums to head_dim / 2).
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": [6, 5, 5],
            "mrope_interleaved": True,
        },
    }


def _vision_config() -> dict[str, object]:
    return {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 4,
        "out_hidden_size": 128,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [0, 1],
    }


def _train_tokenizer(vocab_size: int) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    tokenizer.train_from_iterator(lines * 20, trainer=trainer)
    return tokenizer


# *experts*: the same model with a mixture of experts in every layer (Qwen3-VL-30B-A3B's shape).
MOE_TEXT = {
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 128,
    "decoder_sparse_step": 1,
}


def build_demo_model(
    directory: str | Path, *, seed: int = 0, shard_size: str | None = None, experts: bool = False
) -> Path:
    """Write the tiny checkpoint into *directory* (created if needed) and return its path.

    Deterministic for a given *seed*; takes a few seconds on a CPU and needs no network.
    *shard_size* (e.g. "1MB") splits the weights into shards with an index, as real
    checkpoints are (a download then reports progress shard by shard). *experts*: a mixture
    of experts in each layer (qwen3_vl_moe, as 30B-A3B), for tests of the experts' paths.
    """
    import torch
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
    )
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)

    backend = _train_tokenizer(vocab_size=1024)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[3:],
        model_max_length=32768,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}

    text = _text_config()
    text["vocab_size"] = len(tokenizer)
    if experts:
        text.update(MOE_TEXT)
    config = (Qwen3VLMoeConfig if experts else Qwen3VLConfig)(
        text_config=text,
        vision_config=_vision_config(),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    config.text_config.pad_token_id = ids["<|endoftext|>"]
    config.eos_token_id = ids["<|im_end|>"]

    torch.manual_seed(seed)
    model = (Qwen3VLMoeForConditionalGeneration if experts else Qwen3VLForConditionalGeneration)(
        config
    ).eval()
    with torch.no_grad():
        for param in model.parameters():  # a wider spread than the default init: less bland answers
            if param.dim() > 1:
                param.normal_(0.0, 0.08)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    shards = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(target, safe_serialization=True, **shards)
    tokenizer.save_pretrained(target)

    processor = Qwen2VLImageProcessorPil(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        size={"shortest_edge": 32 * 32 * 4, "longest_edge": 1280 * 32 * 32},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor.save_pretrained(target)
    (target / "vlbridge.json").write_text(
        json.dumps({"kind": DEMO_MARKER, "version": DEMO_VERSION, "seed": seed}, indent=2)
    )
    log.info("built demo model in %s (%d parameters)", target, sum(p.numel() for p in model.parameters()))
    return target


def is_demo_model(directory: str | Path) -> bool:
    """True when *directory* holds a demo checkpoint of the current version."""
    marker = Path(directory) / "vlbridge.json"
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return bool(meta.get("kind") == DEMO_MARKER and meta.get("version") == DEMO_VERSION)


def ensure_demo_model(storage: Path) -> Path:
    """Return the demo checkpoint under *storage*, building it once if missing or stale."""
    directory = storage / "demo-model"
    if not is_demo_model(directory):
        build_demo_model(directory)
    return directory
