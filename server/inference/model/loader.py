"""Load a Qwen3-VL checkpoint (dense or MoE) with its tokenizer and image-only processor.

Works from a local directory or a hub id (downloaded by the hub client when reachable).
torchvision is optional: the processor is always assembled from `AutoTokenizer` and
`AutoImageProcessor` (the PIL implementation when torchvision is absent), because the
stock `AutoProcessor` for Qwen3-VL needs torchvision's video processor.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
from transformers.utils import cached_file
from transformers.utils import logging as hf_logging

from server.errors import ModelLoadError
from server.inference.model.devices import resolve_device, resolve_dtype

log = logging.getLogger("vlbridge.model")


@dataclass
class LoadedModel:
    model: Any  # Qwen3VLForConditionalGeneration | Qwen3VLMoeForConditionalGeneration
    tokenizer: Any
    image_processor: Any
    chat_template: str
    device: torch.device
    dtype: torch.dtype
    name: str


def _chat_template(path: str, tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        return template
    for name in ("chat_template.jinja", "chat_template.json"):
        try:
            found = cached_file(path, name, _raise_exceptions_for_missing_entries=False)
        except OSError:
            found = None
        if found:
            with open(found, encoding="utf-8") as handle:
                text = handle.read()
            return str(json.loads(text)["chat_template"]) if name.endswith(".json") else text
    raise ModelLoadError(f"{path}: no chat template (tokenizer, chat_template.jinja or chat_template.json)")


def load_model(path: str, device_spec: str = "auto", dtype_spec: str = "auto") -> LoadedModel:
    """Load weights, tokenizer and image processor; raises ModelLoadError with the cause."""
    device = resolve_device(device_spec)
    dtype = resolve_dtype(dtype_spec, device)
    hf_logging.disable_progress_bar()  # progress bars garble service logs
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = AutoImageProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, attn_implementation="sdpa", device_map=str(device)
        )
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ModelLoadError(f"cannot load model {path!r}: {exc}") from exc
    model.eval()
    arch = type(model).__name__
    if not arch.startswith("Qwen3VL"):
        raise ModelLoadError(f"{path!r} is a {arch}; vlbridge serves Qwen3-VL checkpoints")
    log.info("loaded %s (%s) on %s as %s", path, arch, device, str(dtype).removeprefix("torch."))
    return LoadedModel(
        model, tokenizer, image_processor, _chat_template(path, tokenizer), device, dtype, path
    )
