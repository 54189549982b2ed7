"""The vision encoder, run once per picture: outputs cached by the picture's content hash.

A picture asked about again (a follow-up that could not reuse the cached prefix, the same
screenshot sent by several users, a retry) costs no encoder work. Entries are the
encoder's merged output for the language model and its deepstack features, on the device,
evicted least recently used beyond a byte budget (0 turns the cache off).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("vlbridge.model.vision")


@dataclass
class Encoded:
    embeds: torch.Tensor  # (tokens, hidden)
    deepstack: list[torch.Tensor]  # one (tokens, hidden) per deepstack layer

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.embeds, *self.deepstack))


@dataclass
class Picture:
    """One picture of a prompt, to encode: its hash, patches (pinned, CPU) and grid (t, h, w)."""

    digest: bytes
    pixels: torch.Tensor
    grid: torch.Tensor  # (1, 3)


class VisionEncoder:
    """Encodes pictures for prefill through the model's own `get_image_features`."""

    def __init__(self, model: Any, budget_bytes: int) -> None:
        self._model = model
        self.budget = budget_bytes
        self._cache: OrderedDict[bytes, Encoded] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def encode(self, pictures: list[Picture], device: torch.device, dtype: torch.dtype) -> list[Encoded]:
        """The encoder outputs of *pictures*, in order; the ones not cached run in one batch."""
        found: dict[bytes, Encoded] = {}
        missing: list[Picture] = []
        for picture in pictures:
            entry = self._cache.get(picture.digest)
            if entry is not None:
                self._cache.move_to_end(picture.digest)
                found[picture.digest] = entry
                self.hits += 1
            elif picture.digest not in {p.digest for p in missing}:
                missing.append(picture)
                self.misses += 1
        if missing:
            pixels = torch.cat([p.pixels.to(device, dtype, non_blocking=True) for p in missing])
            grid = torch.cat([p.grid for p in missing]).to(device)
            out = self._model.model.get_image_features(pixels, grid, return_dict=True)
            for number, picture in enumerate(missing):
                entry = Encoded(
                    out.pooler_output[number], [level[number] for level in out.deepstack_features]
                )
                found[picture.digest] = entry
                self._keep(picture.digest, entry)
        return [found[p.digest] for p in pictures]

    def _keep(self, digest: bytes, entry: Encoded) -> None:
        size = entry.nbytes
        if size > self.budget:
            return
        # Copies: the outputs are views of the whole batch's tensors, which would stay alive.
        self._cache[digest] = Encoded(entry.embeds.clone(), [level.clone() for level in entry.deepstack])
        self._bytes += size
        while self._bytes > self.budget:
            _, old = self._cache.popitem(last=False)
            self._bytes -= old.nbytes

    def clear(self) -> None:
        self._cache.clear()
        self._bytes = 0
