"""Turn a conversation (text and pictures) into model inputs.

This is the processor's job, done without torchvision: render the chat template,
preprocess pictures with the image processor, expand each picture placeholder into its
visual tokens and tokenize. It runs on a preprocessing thread, off the model's thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from server.errors import BadImage, TooLarge
from server.inference.api import Turn
from server.inference.images import ImageLimits, decode_image

from .loader import LoadedModel

IMAGE_PAD = "<|image_pad|>"


@dataclass
class Prompt:
    """Model inputs for one request, on the CPU."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None  # (patches, channels*temporal*patch*patch)
    image_grid_thw: torch.Tensor | None  # (images, 3)
    image_tokens: int

    def __len__(self) -> int:
        return len(self.input_ids)


class PromptBuilder:
    """Builds `Prompt`s for one loaded model; thread-safe (the tokenizer is re-entrant)."""

    def __init__(self, loaded: LoadedModel, limits: ImageLimits, max_context_tokens: int) -> None:
        self.tokenizer = loaded.tokenizer
        self.image_processor = loaded.image_processor
        self.chat_template = loaded.chat_template
        self.limits = limits
        self.max_context_tokens = max_context_tokens
        self.merge = int(getattr(self.image_processor, "merge_size", 2))
        self.dtype = loaded.dtype
        self.pin = loaded.device.type == "cuda"
        self.image_token_id = int(loaded.model.config.image_token_id)

    def _messages(self, turns: list[Turn]) -> list[dict[str, Any]]:
        rendered: list[dict[str, Any]] = []
        for turn in turns:
            parts: list[dict[str, str]] = [{"type": "image"} for _ in turn.images]
            if turn.text or not parts:
                parts.append({"type": "text", "text": turn.text})
            rendered.append({"role": turn.role, "content": parts})
        return rendered

    def _pictures(self, turns: list[Turn]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        images: list[Image.Image] = []
        for number, data in enumerate((img for turn in turns for img in turn.images), start=1):
            try:
                images.append(decode_image(data, self.limits))
            except (BadImage, TooLarge) as exc:
                raise type(exc)(f"picture {number}: {exc.message}") from None
        if not images:
            return None, None
        factor = 16 * self.merge
        features = self.image_processor(
            images=images,
            size={"shortest_edge": factor * factor, "longest_edge": self.limits.max_pixels},
            return_tensors="pt",
        )
        pixels = features["pixel_values"].to(self.dtype)  # half the bytes to move for bf16 models
        return (pixels.pin_memory() if self.pin else pixels), features["image_grid_thw"]

    def build(self, turns: list[Turn]) -> Prompt:
        """Inputs for *turns*; the oldest turns are dropped while the whole is over the context limit.

        Raises BadImage / TooLarge for bad pictures or a last turn that alone is too long.
        """
        turns = list(turns)
        while True:
            try:
                return self._build(turns)
            except TooLarge:
                first_user = next((i for i, t in enumerate(turns) if t.role == "user"), len(turns))
                if len(turns) - first_user <= 1:
                    raise
                del turns[first_user]  # forget the oldest exchange first
                while first_user < len(turns) - 1 and turns[first_user].role == "assistant":
                    del turns[first_user]

    def _build(self, turns: list[Turn]) -> Prompt:
        pixel_values, grid = self._pictures(turns)
        text: str = self.tokenizer.apply_chat_template(
            self._messages(turns),
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=True,
        )
        counts = [] if grid is None else [int(t * h * w) // (self.merge**2) for t, h, w in grid.tolist()]
        pieces = text.split(IMAGE_PAD)
        if len(pieces) - 1 != len(counts):
            raise BadImage(f"the chat template placed {len(pieces) - 1} pictures, expected {len(counts)}")
        expanded = pieces[0] + "".join(
            IMAGE_PAD * n + piece for n, piece in zip(counts, pieces[1:], strict=True)
        )
        ids: list[int] = self.tokenizer(expanded, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_context_tokens:
            raise TooLarge(
                f"the conversation is {len(ids)} tokens; the model accepts {self.max_context_tokens}. "
                "Start a new conversation or send a smaller picture."
            )
        return Prompt(ids, pixel_values, grid, sum(counts))
