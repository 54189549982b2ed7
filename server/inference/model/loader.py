"""Load a Qwen3-VL checkpoint (dense or MoE) with its tokenizer and image-only processor.

Works from a local directory or a hub id (fetched into the hub cache with progress, `fetch`).
torchvision is optional: the processor is always assembled from `AutoTokenizer` and
`AutoImageProcessor` (the PIL implementation when torchvision is absent), because the
stock `AutoProcessor` for Qwen3-VL needs torchvision's video processor.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
from transformers.utils import cached_file
from transformers.utils import logging as hf_logging

from server.errors import ModelLoadError
from server.inference.loading import LoadProgress
from server.inference.model.checkpoint import check_memory
from server.inference.model.devices import resolve_device, resolve_dtype
from server.inference.model.fetch import first_line, model_folder

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


def _check_memory(directory: str, device: torch.device, dtype: torch.dtype) -> None:
    if device.type != "cuda":
        return  # RAM: the OS pages, and a CPU host is rarely shared with another model
    free, _total = torch.cuda.mem_get_info(device)
    check_memory(Path(directory), str(dtype).removeprefix("torch."), str(device), int(free))


def load_model(
    path: str,
    device_spec: str = "auto",
    dtype_spec: str = "auto",
    progress: LoadProgress | None = None,
    log_interval: float = 5.0,
) -> LoadedModel:
    """Fetch (a hub id), check and load weights, tokenizer and image processor.

    Raises `ModelLoadError` with one line saying what to do: a folder that does not exist or
    is no Qwen3-VL checkpoint, a hub that cannot be reached without a cached copy, too little
    free GPU memory for the weights (checked before loading), or the libraries' own refusal."""
    progress = progress or LoadProgress()
    device = resolve_device(device_spec)
    dtype = resolve_dtype(dtype_spec, device)
    hf_logging.disable_progress_bar()  # fetch draws the download's one bar; loading needs none
    source = str(model_folder(path, progress, log_interval))
    _check_memory(source, device, dtype)
    progress(0.6, f"loading weights on {device}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        image_processor = AutoImageProcessor.from_pretrained(source)
        model = AutoModelForImageTextToText.from_pretrained(
            source, dtype=dtype, attn_implementation="sdpa", device_map=str(device)
        )
    except torch.cuda.OutOfMemoryError as exc:
        raise ModelLoadError(
            f"{path} does not fit on {device} ({first_line(exc)}): free memory there or use a smaller model"
        ) from exc
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ModelLoadError(f"cannot load model {path!r}: {first_line(exc)}") from exc
    model.eval()
    arch = type(model).__name__
    if not arch.startswith("Qwen3VL"):
        raise ModelLoadError(f"{path!r} is a {arch}; vlbridge serves Qwen3-VL checkpoints")
    log.info("loaded %s (%s) on %s as %s", path, arch, device, str(dtype).removeprefix("torch."))
    return LoadedModel(
        model, tokenizer, image_processor, _chat_template(source, tokenizer), device, dtype, path
    )
