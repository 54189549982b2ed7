"""CUDA graphs of the packed prefill forward: a slice's language-model pass in one replay.

The packed forward (prefill.py) launches ~9 kernels a layer from Python. On an H200 its host time
was 17 ms for one picture's 1043 tokens (7.5 ms of device work) and ~18-25 ms for a slice of 4-5
pictures, most of it holding the GIL the server's event loop and preparation threads want (the
largest share of the worker's GIL samples in `bench/server_gil.sh`). A graph replays the same
kernels for a few microseconds of host time.

A graph has fixed shapes, so a prefill is padded to a bucket (`buckets`): `size` new tokens (fine
steps for small prefills, coarser for large ones) and `slack` reused ones (a follow-up's new turn
reuses the whole conversation before it: small `size`, large `slack`), laid out as:
- the real rows' new tokens, then padding tokens up to `size` (at least one): token 0 at position
  0, its keys and values stored in the scratch page (page 0, as the decode step's padded rows);
- the keys gathered for attention: the real rows' whole sequences, then scratch slots up to
  `size + slack`; the padding tokens form one more row, attending to as many scratch keys as it
  has tokens (the keys after it are read by no row), and the row offsets end with empty rows up
  to `max_rows` + 2 entries; so a graph serves every batch of up to `max_rows` rows, `size - 1`
  new tokens and `slack` reused ones. The attention reads its offsets on the device;
- picture rows and each row's last token index the padding token where a batch has fewer.
Its inputs are staged in pinned memory and copied in one transfer into static buffers, the
pictures' encoder outputs into static buffers of their own; the logits land in a static buffer.
A prefill these do not fit (more rows or tokens, or every position's logits) runs eagerly.

All buckets are captured at warm-up (largest first, one memory pool), then the graphs are checked
against the eager forward on a batch of two rows with a picture and a reused prefix and on a
follow-up (captured with other offsets, so a kernel that baked its inputs in at capture fails the
check); a failed capture or check turns the graphs off for good. On a CPU (tests) the same padded
layout runs eagerly.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from .agreement import relative_error
from .kvcache import SeqCache

if TYPE_CHECKING:
    from .prefill import Packed, PrefillForward

log = logging.getLogger("vlbridge.model.prefill")

SLACKS = (256, 1024, 2048, 4096, 8192, 16384)  # reused tokens a batch may attend to beyond its new ones
FOLLOW_UP = 1024  # new tokens up to which the larger slacks have graphs (a follow-up's turn)
GRAPH_TOKENS = 8192  # the largest bucket: a slice of ~7 new 1024x1024 pictures
GRAPH_ROWS = 8  # rows a graph takes (slices hold up to ~7)
# Largest relative difference from the eager forward a graph may show: bf16 rounding differs with
# the padded GEMM shapes and accumulates over the layers (0.027 seen on an H200 for 2B, as the
# engine against transformers in teacher forcing: 0.025-0.030); a wrong page, offset or padding
# index gives differences of the order of the logits themselves (tests/test_prefill.py).
TOLERANCE = 0.1
SECTIONS = ("ids", "positions", "store", "gather", "pictures", "last", "starts")


def buckets(limit: int) -> list[tuple[int, int]]:
    """(new tokens, reused tokens) padded to: new 64 and 128 (a text follow-up's turn is tens of
    tokens: padded to 256 it cost ~4x the GEMM work it needs), then every 256 up to 2048 (a single
    picture is ~1050 tokens), then every 512, with the smallest slack; small prefills with every
    slack too."""
    sizes = [size for size in (64, 128) if size <= limit]
    sizes += list(range(256, min(limit, 2048) + 1, 256)) + list(range(2048 + 512, limit + 1, 512))
    small = SLACKS[0]
    return [(size, slack) for size in sizes for slack in SLACKS if slack == small or size <= FOLLOW_UP]


class PrefillGraphs:
    def __init__(self, forward: PrefillForward, limit: int, max_rows: int, levels: int) -> None:
        self.forward = forward
        self.buckets = buckets(limit)
        self.limit = max((size for size, _ in self.buckets), default=0)
        self.max_rows = max_rows
        self.capture = forward.cuda  # on a CPU the padded layout runs eagerly (tests)
        self.enabled = self.limit > 0 and (not forward.cuda or (forward.fused and forward.varlen is not None))
        device = forward.device
        widths = {
            "ids": self.limit,
            "positions": 3 * self.limit,
            "store": self.limit,
            "gather": self.limit + SLACKS[-1],
            "pictures": self.limit,
            "last": max_rows,
            "starts": 2 * (max_rows + 2),
        }
        self._offsets: dict[str, int] = {}
        total = 0
        for name in SECTIONS:
            self._offsets[name] = total
            total += widths[name]
        self._device = torch.zeros(total, dtype=torch.long, device=device)
        self._host = [torch.zeros(total, dtype=torch.long, pin_memory=self.capture) for _ in range(2)]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        hidden = forward.embed.embedding_dim
        dtype = forward.embed.weight.dtype
        self._embeds = torch.zeros(self.limit, hidden, dtype=dtype, device=device)
        self._deep = [torch.zeros(self.limit, hidden, dtype=dtype, device=device) for _ in range(levels)]
        self._logits = torch.zeros(max_rows, forward.lm_head.out_features, dtype=torch.float32, device=device)
        self._graphs: dict[tuple[int, int], Any] = {}  # torch.cuda.CUDAGraph by bucket
        self._pool: Any = None
        self._lists: tuple[list[int], list[int]] = ([], [])  # padded offsets (CPU attention)

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def key(self, batch: Packed) -> tuple[int, int] | None:
        """The bucket whose graph takes *batch*, if one does."""
        rows = len(batch.query_starts) - 1
        new, reused = batch.query_starts[-1], batch.key_starts[-1] - batch.query_starts[-1]
        if not self.enabled or rows > self.max_rows:
            return None
        return next(((size, slack) for size, slack in self.buckets if size > new and slack >= reused), None)

    def run(
        self, batch: Packed, embeds: torch.Tensor | None, deepstack: list[torch.Tensor]
    ) -> torch.Tensor | None:
        """Logits of each row's last token (rows, vocab), valid until the next call; None when no
        graph takes *batch* (run it eagerly)."""
        bucket = self.key(batch)
        if bucket is None or (self.capture and bucket not in self._graphs):
            return None
        self._stage(bucket, batch, embeds, deepstack)
        if self.capture:
            self._graphs[bucket].replay()
        else:
            self._body(bucket)
        return self._logits[: len(batch.query_starts) - 1]

    # ---- the padded layout ----------------------------------------------------------------------------

    def _section(self, buffer: torch.Tensor, name: str, length: int) -> torch.Tensor:
        start = self._offsets[name]
        return buffer[start : start + length]

    def _stage(
        self,
        bucket: tuple[int, int],
        batch: Packed | None,
        embeds: torch.Tensor | None,
        deepstack: list[torch.Tensor],
    ) -> None:
        """*batch* (None: no rows, the padding is everything) into the static inputs of *bucket*."""
        size, slack = bucket
        self._turn ^= 1
        host, copied = self._host[self._turn], self._copied[self._turn]
        if copied is not None:
            copied.synchronize()  # the transfer from this buffer, two prefills ago
        parts = batch.host if batch is not None else {}

        def fill(name: str, length: int, pad: int) -> None:
            section = self._section(host, name, length)
            real = parts[name].flatten() if name in parts else section[:0]
            section[: real.numel()] = real
            section[real.numel() :] = pad

        fill("ids", size, 0)
        positions = self._section(host, "positions", 3 * self.limit).view(3, self.limit)[:, :size]
        positions.zero_()
        if parts:
            positions[:, : parts["positions"].shape[1]] = parts["positions"]
        fill("store", size, 0)
        fill("gather", size + slack, 0)
        fill("pictures", size, size - 1)
        fill("last", self.max_rows, size - 1)
        query = list(batch.query_starts) if batch is not None else [0]
        key = list(batch.key_starts) if batch is not None else [0]
        end = key[-1] + size - query[-1]  # the padding row: as many keys as tokens
        query += [size] * (self.max_rows + 2 - len(query))
        key += [end] * (self.max_rows + 2 - len(key))
        self._section(host, "starts", 2 * (self.max_rows + 2))[:] = torch.tensor(query + key)
        self._lists = (query, key)
        self._device.copy_(host, non_blocking=True)
        if self.capture:
            event = torch.cuda.Event()
            event.record()
            self._copied[self._turn] = event
        count = int(parts["pictures"].numel()) if parts else 0
        if embeds is not None and count:
            self._embeds[:count].copy_(embeds)
            for buffer, level in zip(self._deep, deepstack, strict=True):
                buffer[:count].copy_(level)

    def _view(self, bucket: tuple[int, int]) -> Packed:
        from .prefill import Packed

        size, slack = bucket
        query, key = self._lists
        positions = self._section(self._device, "positions", 3 * self.limit).view(3, self.limit)
        sent: dict[str, torch.Tensor | None] = {
            "ids": self._section(self._device, "ids", size),
            "positions": positions[:, :size],
            "store": self._section(self._device, "store", size),
            "gather": self._section(self._device, "gather", size + slack),
            "copy_from": None,
            "copy_to": None,
            "pictures": self._section(self._device, "pictures", size),
            "last": self._section(self._device, "last", self.max_rows),
            "starts": self._section(self._device, "starts", 2 * (self.max_rows + 2)).view(2, -1).int(),
        }
        return Packed({}, query, key, size, size + slack, self.forward.device, sent)

    def _body(self, bucket: tuple[int, int]) -> None:
        """The padded forward: what a graph records."""
        batch = self._view(bucket)
        size = bucket[0]
        logits = self.forward.logits(batch, self._embeds[:size], [level[:size] for level in self._deep])
        self._logits.copy_(logits)

    # ---- capture and check ----------------------------------------------------------------------------

    @torch.inference_mode()
    def warm_up(self, checks: list[Packed]) -> int:
        """Capture every bucket (largest first), then compare the graphs with the eager forward on
        *checks* (see `check_batches`); graphs captured."""
        if not (self.enabled and self.capture):
            return 0
        started = time.monotonic()
        try:
            for bucket in sorted(self.buckets, key=lambda b: b[0] + b[1], reverse=True):
                self._stage(bucket, None, None, [])
                self._graphs[bucket] = self._record(bucket)
        except Exception:
            log.exception("capturing a prefill CUDA graph failed; prefilling eagerly")
            self._off()
            return 0
        if not all(self._agrees(check) for check in checks):
            self._off()
            return 0
        log.info("prefill: %d CUDA graphs (up to %d tokens) in %.1f s", len(self._graphs), self.limit,
                 time.monotonic() - started)  # fmt: skip
        return len(self._graphs)

    def _record(self, bucket: tuple[int, int]) -> Any:
        side = torch.cuda.Stream(self.forward.device)
        side.wait_stream(torch.cuda.current_stream(self.forward.device))
        with torch.cuda.stream(side):
            self._body(bucket)  # warm-up outside the capture: allocator, lazy initialisations, kernels
        torch.cuda.current_stream(self.forward.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            self._body(bucket)
        self._pool = graph.pool()
        return graph

    def _agrees(self, batch: Packed) -> bool:
        """Graph against eager on *batch* (its pictures' embeddings random)."""
        generator = torch.Generator(device=self.forward.device).manual_seed(0)
        count = 0 if batch.pictures is None else int(batch.pictures.numel())
        shape = (count, self._embeds.shape[1])
        embeds = torch.randn(shape, generator=generator, device=self.forward.device).to(self._embeds.dtype)
        deep = [torch.randn(shape, generator=generator, device=self.forward.device).to(embeds.dtype)
                for _ in self._deep]  # fmt: skip
        expected = self.forward.logits(batch, embeds if count else None, deep if count else [])
        got = self.run(batch, embeds if count else None, deep if count else [])
        if got is None:
            log.warning("no prefill CUDA graph takes the check's batch; graphs off")
            return False
        error = relative_error(got, expected)
        if error > TOLERANCE:
            log.warning("a prefill CUDA graph differs from the eager forward by %.3f; graphs off", error)
            return False
        log.info(
            "prefill CUDA graph %s against the eager forward: relative difference %.3f",
            self.key(batch),
            error,
        )
        return True

    def _off(self) -> None:
        self.enabled = False
        self._graphs.clear()
        self._pool = None


def check_batches(cache: SeqCache, image_token_id: int, device: torch.device) -> list[Packed]:
    """Batches for checking the graphs, in *cache*'s first 360 slots: two rows (200 new tokens with
    a picture of 64 tokens; 60 new tokens after a reused prefix of 100), and a follow-up (30 new
    tokens after 300 reused)."""
    from .prefill import pack

    generator = torch.Generator().manual_seed(0)
    first = torch.randint(0, image_token_id, (200,), generator=generator)
    first[20:84] = image_token_id
    second = torch.randint(0, image_token_id, (60,), generator=generator)
    follow = torch.randint(0, image_token_id, (30,), generator=generator)
    slots = torch.tensor([cache.slot(index) for index in range(360)])
    rows = [
        (first.tolist(), torch.arange(200).expand(3, -1), slots[:200], 0),
        (second.tolist(), torch.arange(100, 160).expand(3, -1), slots[200:], 100),
    ]
    follow_up = [(follow.tolist(), torch.arange(300, 330).expand(3, -1), slots[:330], 300)]
    return [pack(rows, [], image_token_id, device), pack(follow_up, [], image_token_id, device)]
