"""Turn a conversation (text and pictures) into model inputs.

This is the processor's job, done without torchvision: render the chat template, decode
pictures and size their patch grids, expand each picture placeholder into its visual tokens
and tokenize. It runs on a preprocessing thread, off the model's thread. The rest of the image
processor's work (resize, normalize, patchify) is left to the device, at prefill
(`pixels.patches`): on these threads it cost several times the decoding and held a core.

Decoded pictures are kept by content hash (`PICTURE_CACHE_BYTES`): every follow-up question
of a conversation carries its pictures again, and decoding them again would otherwise be most
of a text follow-up's preparation. What remained of it (2.3 ms for a follow-up about a
1024x1024 JPEG on the 2-core VM) was mostly two things, now gone (0.5 ms): hashing the ~1 MB
picture again (0.8 ms), so hashes are kept by the picture's bytes object (`DIGEST_CACHE_BYTES`;
a session's history hands the same objects in again); and tokenizing ~1000 copies of the pad's
text (1.0 ms), so each picture's pad ids are spliced in between the tokenized pieces around
them: the tokenizer splits at special tokens before anything else, so those pieces tokenize
alone to the same ids (`tests/test_prompt.py` compares the two).
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from protocol.pictures import ImageLimits
from server.errors import BadImage, RequestError, TooLarge
from server.inference.api import Turn
from server.inference.engine import Check, keep_going
from server.inference.images import decode_image
from server.inference.picture_processes import PictureProcesses

from .loader import LoadedModel
from .pixels import Decoded, PixelSpec, patches

IMAGE_PAD = "<|image_pad|>"
PICTURE_CACHE_BYTES = 256 * 2**20  # decoded pictures kept (uint8): ~80 of 1024x1024
DIGEST_CACHE_BYTES = 64 * 2**20  # pictures' bytes objects whose hashes are kept (held while kept)


@dataclass
class Prompt:
    """Model inputs for one request, on the CPU."""

    input_ids: list[int]
    pictures: list[Decoded]  # in the order of their tokens, each with its digest
    image_grid_thw: torch.Tensor | None  # (images, 3)
    image_tokens: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def pixel_values(
        self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor | None:
        """The processor's `pixel_values` for these pictures, made on *device* (see `pixels.patches`)."""
        return patches(self.pictures, device, dtype) if self.pictures else None


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
        self.spec = PixelSpec.of(self.image_processor, limits.max_pixels)
        self.chat_template = loaded.chat_template
        self.limits = limits
        self.max_context_tokens = max_context_tokens
        self.merge = self.spec.merge
        self.pin = loaded.device.type == "cuda"  # kept pinned: copied to the device without waiting
        self.image_token_id = int(loaded.model.config.image_token_id)
        # The pad's ids are spliced in where the pad is a special token of its own (see the module doc)
        pad = self.tokenizer.added_tokens_decoder.get(self.image_token_id)
        self.splice = pad is not None and pad.content == IMAGE_PAD and pad.special
        self.picture_cache_bytes = picture_cache_bytes
        self.picture_hits = 0  # pictures taken from the cache (tests, benchmarks)
        # Pictures decoded in worker processes (off this process's GIL) when set; else on the
        # calling thread. Set by the engine, which owns and shuts down the processes.
        self.processes: PictureProcesses | None = None
        self._cache: OrderedDict[bytes, Decoded] = OrderedDict()
        self._cache_bytes = 0
        self._digests: OrderedDict[int, tuple[bytes, bytes]] = OrderedDict()  # id(data): (data, digest)
        self._digest_bytes = 0
        self._lock = threading.Lock()

    def _messages(self, turns: list[Turn]) -> list[dict[str, Any]]:
        rendered: list[dict[str, Any]] = []
        for turn in turns:
            parts: list[dict[str, str]] = [{"type": "image"} for _ in turn.images]
            if turn.text or not parts:
                parts.append({"type": "text", "text": turn.text})
            rendered.append({"role": turn.role, "content": parts})
        return rendered

    def _pictures(self, turns: list[Turn], check: Check) -> list[Decoded]:
        """Every picture of *turns*, decoded once (or taken from the cache), in order."""
        datas = [img for turn in turns for img in turn.images]
        digests = [self._digest(data) for data in datas]
        found: dict[bytes, Decoded] = {}
        with self._lock:
            for digest in digests:
                entry = self._cache.get(digest)
                if entry is not None:
                    self._cache.move_to_end(digest)
                    found[digest] = entry
                    self.picture_hits += 1
        missing: dict[bytes, tuple[int, bytes]] = {}  # digest: (its first number, its bytes)
        for number, (data, digest) in enumerate(zip(datas, digests, strict=True), start=1):
            if digest not in found:
                missing.setdefault(digest, (number, data))
        decoded = list(zip(missing, self._decode(list(missing.items()), check), strict=True))
        found.update(decoded)
        self._keep(decoded)
        return [found[d] for d in digests]

    def _decode(self, missing: list[tuple[bytes, tuple[int, bytes]]], check: Check) -> list[Decoded]:
        """Decode the (digest, (number, bytes)) pictures, in order; errors name the first bad
        picture's number. In the worker processes all at once, else one by one on this thread."""
        processes = self.processes
        if processes is None or not missing:
            out = []
            for digest, (number, data) in missing:
                check()
                out.append(self._decoded(number, digest, functools.partial(decode_image, data, self.limits)))
            return out
        datas = [data for _, (_, data) in missing]
        tensors: dict[int, torch.Tensor] = {}  # by id() of the array handed out: its tensor

        def into(shape: tuple[int, ...]) -> np.ndarray:
            # Pinned for a CUDA model: the pixels are copied once (not decoded, then pinned) and
            # reach the device without waiting; the tensor itself is kept, so the pinned-memory
            # allocator sees the copy that reads it.
            tensor = torch.empty(shape, dtype=torch.uint8, pin_memory=self.pin)
            array = tensor.numpy()
            tensors[id(array)] = tensor
            return array

        outcomes = processes.decode(datas, self.limits, check, into)
        return [
            self._decoded(
                number,
                digest,
                functools.partial(
                    _given, tensors[id(outcome)] if isinstance(outcome, np.ndarray) else outcome
                ),
            )
            for (digest, (number, _)), outcome in zip(missing, outcomes, strict=True)
        ]

    def _decoded(self, number: int, digest: bytes, image: Callable[[], object]) -> Decoded:
        """`Decoded` of what *image* gives (a PIL image, pixels from a worker process as a
        tensor, or the error it met), errors naming picture *number*."""
        try:
            made = image()
            if isinstance(made, RequestError):
                raise made
            if isinstance(made, torch.Tensor):  # from a worker process, already in its final memory
                size = self.spec.target(int(made.shape[0]), int(made.shape[1]))
                return Decoded(made, size, self.spec, digest)
            assert isinstance(made, Image.Image)
            picture = Decoded.of(made, self.spec, digest)
        except (BadImage, TooLarge) as exc:
            raise type(exc)(f"picture {number}: {exc.message}") from None
        except ValueError as exc:  # no patch grid fits it (smart_resize: aspect ratio over 200)
            raise BadImage(f"picture {number}: {exc}") from None
        return picture.pinned() if self.pin else picture

    def _digest(self, data: bytes) -> bytes:
        """*data*'s content hash, kept by the object while it is among the most recent."""
        with self._lock:
            known = self._digests.get(id(data))
            if known is not None and known[0] is data:  # held here, so its id is still its own
                self._digests.move_to_end(id(data))
                return known[1]
        digest = hashlib.blake2b(data, digest_size=16).digest()
        with self._lock:
            if len(data) <= DIGEST_CACHE_BYTES and id(data) not in self._digests:  # (another thread's)
                self._digests[id(data)] = (data, digest)
                self._digest_bytes += len(data)
                while self._digest_bytes > DIGEST_CACHE_BYTES:
                    _, (dropped, _) = self._digests.popitem(last=False)
                    self._digest_bytes -= len(dropped)
        return digest

    def _keep(self, entries: list[tuple[bytes, Decoded]]) -> None:
        with self._lock:
            for digest, entry in entries:
                size = entry.nbytes
                if size > self.picture_cache_bytes or digest in self._cache:
                    continue
                self._cache[digest] = entry
                self._cache_bytes += size
            while self._cache_bytes > self.picture_cache_bytes:
                _, old = self._cache.popitem(last=False)
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
        pictures = self._pictures(turns, check)
        plan = _DropPlan(turns)
        first = self._attempt(plan.kept(0), pictures, check)
        if isinstance(first, Prompt):
            return first
        best, over = None, first
        low, high = 1, plan.steps  # the fewest drops that fit lie in [low, high], if anywhere
        while low <= high:
            middle = (low + high) // 2
            attempt = self._attempt(plan.kept(middle), pictures, check)
            if isinstance(attempt, Prompt):
                best, high = attempt, middle - 1
            else:
                over, low = attempt, middle + 1
        if best is None:
            raise over  # even the last turn alone is too long
        return best

    def _attempt(
        self, kept: list[tuple[Turn, int]], pictures: list[Decoded], check: Check
    ) -> Prompt | TooLarge:
        """The prompt of the *kept* turns (each with the index of its first picture), or why not."""
        check()
        chosen = [pictures[first + n] for turn, first in kept for n in range(len(turn.images))]
        return self._build([turn for turn, _ in kept], chosen)

    def _build(self, turns: list[Turn], pictures: list[Decoded]) -> Prompt | TooLarge:
        text: str = self.tokenizer.apply_chat_template(
            self._messages(turns),
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=True,
        )
        counts = [picture.patch_count // (self.merge**2) for picture in pictures]
        pieces = text.split(IMAGE_PAD)
        if len(pieces) - 1 != len(counts):
            raise BadImage(f"the chat template placed {len(pieces) - 1} pictures, expected {len(counts)}")
        ids = self._tokens(pieces, counts)
        if len(ids) > self.max_context_tokens:
            return TooLarge(
                f"the conversation is {len(ids)} tokens; the model accepts {self.max_context_tokens}. "
                "Start a new conversation or send a smaller picture."
            )
        grid = torch.cat([picture.grid for picture in pictures]) if pictures else None
        return Prompt(ids, pictures, grid, sum(counts))

    def _tokens(self, pieces: list[str], counts: list[int]) -> list[int]:
        """The ids of *pieces* with counts[i] pad tokens between piece i and piece i + 1."""
        if not self.splice:
            expanded = pieces[0] + "".join(
                IMAGE_PAD * n + piece for n, piece in zip(counts, pieces[1:], strict=True)
            )
            return list(self.tokenizer(expanded, add_special_tokens=False)["input_ids"])
        encoded: list[list[int]] = self.tokenizer(pieces, add_special_tokens=False)["input_ids"]
        ids = list(encoded[0])
        for n, piece in zip(counts, encoded[1:], strict=True):
            ids += [self.image_token_id] * n
            ids += piece
        return ids


def _given(value: object) -> object:
    return value


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
