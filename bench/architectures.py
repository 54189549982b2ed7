"""Real Qwen3-VL architectures (from the published configs) for random-weight benchmarks.

No weights are downloaded: `build_checkpoint` instantiates the architecture with random
weights and saves it with the demo model's tokenizer and image processor, so the service
loads it through its normal path. Answers are meaningless; shapes, memory traffic and
kernels are the real ones.
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


def build_checkpoint(name: str, target: Path, demo_dir: Path, dtype: str = "bfloat16") -> float:
    """Write a random-weight checkpoint of architecture *name* to *target*; seconds taken."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.initialization import no_init_weights

    started = time.monotonic()
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
    model.generation_config.eos_token_id = tokenizer_meta.get("eos_token_id")
    model.save_pretrained(target)
    for file in demo_dir.iterdir():
        if file.name.startswith(("tokenizer", "preprocessor", "chat_template", "special_tokens")):
            shutil.copy(file, target / file.name)
    (target / "vlbridge-bench.json").write_text(json.dumps({"architecture": name, "weights": "random"}))
    del model
    torch.cuda.empty_cache()
    return time.monotonic() - started
