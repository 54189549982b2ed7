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
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

from .pixels import Decoded, patches

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
    """One picture of a prompt, to encode: its hash and its decoded pixels (CPU, pinned on CUDA)."""

    digest: bytes
    decoded: Decoded

    @property
    def grid(self) -> torch.Tensor:
        """(1, 3): the picture's (frames, rows, columns) of patches."""
        return self.decoded.grid


class VisionEncoder:
    """Encodes pictures for prefill through the model's own `get_image_features`."""

    def __init__(self, model: Any, budget_bytes: int) -> None:
        self._model = model
        self.budget = budget_bytes
        self._cache: OrderedDict[bytes, Encoded] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.precompute = True  # see _run; off for good if this transformers refuses the tensors

    def encode(self, pictures: list[Picture], device: torch.device, dtype: torch.dtype) -> list[Encoded]:
        """The encoder outputs of *pictures*, in order; the ones not cached run in one batch, their
        patches made on *device* first (`pixels.patches`: cached pictures cost not even that)."""
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
            run = self._run if self.precompute else self._stock
            embeds, deepstack = run(missing, device, dtype)
            for number, picture in enumerate(missing):
                entry = Encoded(embeds[number], [level[number] for level in deepstack])
                found[picture.digest] = entry
                self._keep(picture.digest, entry)
        return [found[p.digest] for p in pictures]

    def _run(
        self, pictures: list[Picture], device: torch.device, dtype: torch.dtype
    ) -> tuple[tuple[torch.Tensor, ...], list[tuple[torch.Tensor, ...]]]:
        """The encoder over *pictures* in one batch: each one's merged output and deepstack features.

        What the encoder derives from the grid is computed here from the grid on the CPU and
        passed in (transformers' precomputed-kwargs hooks), because from a device grid it costs
        host-device syncs: one for the rotary positions, one per layer for the attention's
        per-picture split (its SDPA path splits by `cu_seqlens.tolist()`), one for the output
        split. Each sync leaves the GPU idle while the host launches the next layer's kernels
        (and waits for any decode step queued before the prefill). Same values, same results.
        """
        visual = self._model.model.visual
        grid = torch.cat([p.grid for p in pictures])
        pixels = patches([p.decoded for p in pictures], device, dtype)
        merge = int(visual.spatial_merge_size)
        precomputed: dict[str, Any] = {
            "position_ids": get_vision_position_ids(grid, merge).to(device, non_blocking=True)
        }
        if "flash" not in str(getattr(visual.config, "_attn_implementation", "")):
            precomputed["cu_seqlens"] = get_vision_cu_seqlens(grid)  # stays on the CPU: only split by
        try:
            out = visual(pixels, grid_thw=grid.to(device, non_blocking=True), return_dict=True, **precomputed)
        except (RuntimeError, TypeError, ValueError):  # e.g. a device mismatch: raised at launch
            log.warning("the vision encoder refused precomputed grid tensors; using its own", exc_info=True)
            self.precompute = False
            return self._stock(pictures, device, dtype)
        sizes = (grid.prod(-1) // merge**2).tolist()
        return (
            torch.split(out.pooler_output, sizes),
            [torch.split(level, sizes) for level in out.deepstack_features],
        )

    def _stock(
        self, pictures: list[Picture], device: torch.device, dtype: torch.dtype
    ) -> tuple[tuple[torch.Tensor, ...], list[tuple[torch.Tensor, ...]]]:
        """transformers' own `get_image_features`."""
        pixels = patches([p.decoded for p in pictures], device, dtype)
        grid = torch.cat([p.grid for p in pictures]).to(device)
        out = self._model.model.get_image_features(pixels, grid, return_dict=True)
        return tuple(out.pooler_output), [tuple(level) for level in out.deepstack_features]

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
