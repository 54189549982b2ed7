"""ModelRunner: owns the loaded model on one thread and runs its forward passes."""

from __future__ import annotations

import logging
from typing import Any

import torch

from protocol.pictures import ImageLimits
from server.inference.api import SamplingParams, Turn
from server.inference.loading import LoadProgress

from .loader import LoadedModel, load_model
from .pixels import patches
from .prompt import Prompt, PromptBuilder

log = logging.getLogger("vlbridge.model")


class ModelRunner:
    """The loaded model plus everything needed to feed it. Not thread-safe: one owner."""

    def __init__(self, loaded: LoadedModel, limits: ImageLimits, max_context_tokens: int) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.prompts = PromptBuilder(loaded, limits, max_context_tokens)
        self.tokenizer = loaded.tokenizer
        eos = self.model.generation_config.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        ids.append(self.tokenizer.eos_token_id)
        self.eos_token_ids: frozenset[int] = frozenset(int(i) for i in ids if i is not None)
        self.pad_token_id = int(self.tokenizer.pad_token_id or next(iter(self.eos_token_ids)))

    @classmethod
    def load(
        cls,
        path: str,
        *,
        device: str,
        dtype: str,
        limits: ImageLimits,
        max_context_tokens: int,
        progress: LoadProgress | None = None,
        log_interval: float = 5.0,
    ) -> ModelRunner:
        return cls(load_model(path, device, dtype, progress, log_interval), limits, max_context_tokens)

    def model_inputs(self, prompts: list[Prompt]) -> dict[str, Any]:
        """Left-padded batch inputs for `model.generate` / `model.forward`."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt.input_ids)
            mask[row, width - len(prompt) :] = 1
        inputs: dict[str, Any] = {
            "input_ids": ids.to(self.device),
            "attention_mask": mask.to(self.device),
            "mm_token_type_ids": (ids == self.prompts.image_token_id).int().to(self.device),
        }
        pictures = [picture for prompt in prompts for picture in prompt.pictures]
        if pictures:
            # Decoded pictures come pinned from the preprocessing threads: patches made on the device.
            inputs["pixel_values"] = patches(pictures, self.device, self.dtype)
            inputs["image_grid_thw"] = torch.cat([p.grid for p in pictures]).to(self.device)
        return inputs

    @torch.inference_mode()
    def generate_reference(self, turns_batch: list[list[Turn]], params: SamplingParams) -> list[list[int]]:
        """Stock `model.generate` on a static batch: the baseline the executor is checked against."""
        prompts = [self.prompts.build(turns) for turns in turns_batch]
        inputs = self.model_inputs(prompts)
        max_new = params.max_new_tokens or 64
        out = self.model.generate(
            **inputs,
            max_new_tokens=max_new,
            min_new_tokens=params.min_new_tokens or None,
            do_sample=params.temperature > 0,
            temperature=params.temperature or None,
            top_p=params.top_p if params.temperature > 0 else None,
            pad_token_id=self.pad_token_id,
            eos_token_id=sorted(self.eos_token_ids),
        )
        width = inputs["input_ids"].shape[1]
        results: list[list[int]] = []
        for row in out[:, width:].tolist():
            tokens: list[int] = []
            for token in row:
                tokens.append(token)
                if token in self.eos_token_ids:
                    break
            results.append(tokens)
        return results
