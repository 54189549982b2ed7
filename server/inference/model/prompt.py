"""Turn a conversation (text and pictures) into model inputs.

This is the processor's job, done without torchvision: render the chat template,
preprocess pictures with the image processor, expand each picture placeholder into its
visual tokens and tokenize. It runs on a preprocessing thread, off the model's thread.

Preprocessed pictures are kept by content hash (`PICTURE_CACHE_BYTES`): every follow-up
question of a conversation carries its pictures again, and decoding plus the image processor
(~35 ms for a 1024x1024 JPEG on an H200 host, alone; several times that under load) would
otherwise be most of a text follow-up's time to first token.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from protocol.pictures import ImageLimits
from server.errors import BadImage, TooLarge
from server.inference.api import Turn
from server.inference.engine import Check, keep_going
from server.inference.images import decode_image

from .loader import LoadedModel

IMAGE_PAD = "<|image_pad|>"
PICTURE_CACHE_BYTES = 256 * 2**20  # preprocessed pictures kept (in the model's dtype): ~20 of 1024x1024


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

    def __init__(
        self,
        loaded: LoadedModel,
        limits: ImageLimits,
        max_context_tokens: int,
        picture_cache_bytes: int = PICTURE_CACHE_BYTES,
    ) -> None:
        self.tokenizer = loaded.tokenizer
        self.image_processor = loaded.image_processor
        self.chat_template = loaded.chat_template
        self.limits = limits
        self.max_context_tokens = max_context_tokens
        self.merge = int(getattr(self.image_processor, "merge_size", 2))
        self.dtype = loaded.dtype
        self.pin = loaded.device.type == "cuda"
        self.image_token_id = int(loaded.model.config.image_token_id)
        self.picture_cache_bytes = picture_cache_bytes
        self.picture_hits = 0  # pictures taken from the cache (tests, benchmarks)
        self._cache: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()

    def _messages(self, turns: list[Turn]) -> list[dict[str, Any]]:
        rendered: list[dict[str, Any]] = []
        for turn in turns:
            parts: list[dict[str, str]] = [{"type": "image"} for _ in turn.images]
            if turn.text or not parts:
                parts.append({"type": "text", "text": turn.text})
            rendered.append({"role": turn.role, "content": parts})
        return rendered

    def _pictures(self, turns: list[Turn], check: Check) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Every picture of *turns*, preprocessed once (or taken from the cache), in order."""
        datas = [img for turn in turns for img in turn.images]
        if not datas:
            return None, None
        digests = [hashlib.blake2b(data, digest_size=16).digest() for data in datas]
        found: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        with self._lock:
            for digest in digests:
                entry = self._cache.get(digest)
                if entry is not None:
                    self._cache.move_to_end(digest)
                    found[digest] = entry
                    self.picture_hits += 1
        missing: dict[bytes, tuple[int, bytes]] = {}  # each picture not cached, once, by its first place
        for number, (data, digest) in enumerate(zip(datas, digests, strict=True), start=1):
            if digest not in found and digest not in missing:
                missing[digest] = (number, data)
        if missing:
            images: list[Image.Image] = []
            for number, data in missing.values():
                check()
                try:
                    images.append(decode_image(data, self.limits))
                except (BadImage, TooLarge) as exc:
                    raise type(exc)(f"picture {number}: {exc.message}") from None
            check()
            factor = 16 * self.merge
            features = self.image_processor(
                images=images,
                size={"shortest_edge": factor * factor, "longest_edge": self.limits.max_pixels},
                return_tensors="pt",
            )
            # In the model's dtype: half the bytes to keep and to move for bf16 models.
            pixels = (
                features["pixel_values"].to(self.dtype).split(features["image_grid_thw"].prod(-1).tolist())
            )
            for digest, values, grid in zip(missing, pixels, features["image_grid_thw"], strict=True):
                # A copy when the batch held several: a view would keep the whole batch alive.
                found[digest] = (values if len(missing) == 1 else values.clone(), grid[None])
            self._keep([(digest, found[digest]) for digest in missing])
        return (
            torch.cat([found[d][0] for d in digests]),
            torch.cat([found[d][1] for d in digests]),
        )

    def _keep(self, entries: list[tuple[bytes, tuple[torch.Tensor, torch.Tensor]]]) -> None:
        with self._lock:
            for digest, entry in entries:
                size = entry[0].nbytes
                if size > self.picture_cache_bytes or digest in self._cache:
                    continue
                self._cache[digest] = entry
                self._cache_bytes += size
            while self._cache_bytes > self.picture_cache_bytes:
                _, (old, _) = self._cache.popitem(last=False)
                self._cache_bytes -= old.nbytes

    def build(self, turns: list[Turn], check: Check = keep_going) -> Prompt:
        """Inputs for *turns*; the oldest turns are dropped while the whole is over the context limit.

        Dropping goes one exchange at a time: the oldest user turn with the assistant
        turns that answer it (turns before the first user turn, e.g. the system prompt,
        stay; the last turn always stays). The result is the first of those candidates
        that fits, found by bisection (fewer kept turns never make a longer prompt), with
        each picture decoded once: O(n log n) in the turns, not O(n^2).

        Raises BadImage / TooLarge for bad pictures or a last turn that alone is too long;
        whatever *check* raises (it is called between stages).
        """
        turns = list(turns)
        pixels, grid = self._pictures(turns, check)
        plan = _DropPlan(turns)
        first = self._attempt(plan.kept(0), pixels, grid, check)
        if isinstance(first, Prompt):
            return self._finish(first)
        best, over = None, first
        low, high = 1, plan.steps  # the fewest drops that fit lie in [low, high], if anywhere
        while low <= high:
            middle = (low + high) // 2
            attempt = self._attempt(plan.kept(middle), pixels, grid, check)
            if isinstance(attempt, Prompt):
                best, high = attempt, middle - 1
            else:
                over, low = attempt, middle + 1
        if best is None:
            raise over  # even the last turn alone is too long
        return self._finish(best)

    def _finish(self, prompt: Prompt) -> Prompt:
        if prompt.pixel_values is not None and self.pin:
            prompt.pixel_values = prompt.pixel_values.pin_memory()
        return prompt

    def _attempt(
        self,
        kept: list[tuple[Turn, int]],
        pixels: torch.Tensor | None,
        grid: torch.Tensor | None,
        check: Check,
    ) -> Prompt | TooLarge:
        """The prompt of the *kept* turns (each with the index of its first picture), or why not."""
        check()
        chosen = [first + n for turn, first in kept for n in range(len(turn.images))]
        if pixels is not None and grid is not None and chosen and len(chosen) < len(grid):
            sizes = [int(t * h * w) for t, h, w in grid.tolist()]
            offsets = [0]
            for size in sizes:
                offsets.append(offsets[-1] + size)
            pixels = torch.cat([pixels[offsets[i] : offsets[i + 1]] for i in chosen])
            grid = grid[chosen]
        elif not chosen:
            pixels, grid = None, None
        return self._build([turn for turn, _ in kept], pixels, grid)

    def _build(
        self, turns: list[Turn], pixel_values: torch.Tensor | None, grid: torch.Tensor | None
    ) -> Prompt | TooLarge:
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
            return TooLarge(
                f"the conversation is {len(ids)} tokens; the model accepts {self.max_context_tokens}. "
                "Start a new conversation or send a smaller picture."
            )
        return Prompt(ids, pixel_values, grid, sum(counts))


class _DropPlan:
    """Which turns remain after dropping the oldest *k* exchanges, for every k (plain values).

    Exchange j is the j-th user turn with the assistant turns right after it; it may be
    dropped while that user turn is not the last turn.
    """

    def __init__(self, turns: list[Turn]) -> None:
        self.turns = turns
        self.firsts: list[int] = []  # index of each turn's first picture among all pictures
        count = 0
        for turn in turns:
            self.firsts.append(count)
            count += len(turn.images)
        last = len(turns) - 1
        self.exchanges: list[tuple[int, int]] = []  # [start, end) of each droppable exchange
        for index, turn in enumerate(turns):
            if turn.role == "user" and index < last:
                end = index + 1
                while end < last and turns[end].role == "assistant":
                    end += 1
                self.exchanges.append((index, end))
        self.steps = len(self.exchanges)

    def kept(self, k: int) -> list[tuple[Turn, int]]:
        """The turns left after dropping the oldest *k* exchanges, each with its first picture's index."""
        dropped = bytearray(len(self.turns))
        for start, end in self.exchanges[:k]:
            dropped[start:end] = b"\x01" * (end - start)
        return [(turn, self.firsts[i]) for i, turn in enumerate(self.turns) if not dropped[i]]
