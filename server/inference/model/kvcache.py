"""A paged KV cache: fixed-size pages in one preallocated pool per layer.

Each sequence holds a list of pages (its page table) sized for its whole answer at
admission, so decoding never allocates and a finished sequence gives its pages back at
once. Page 0 is scratch: padded rows of a CUDA-graph batch write there. Decode attention
reads each row only up to its own length (see attention.py), so its cost follows the
rows' real lengths, not the longest row or the pool size.

The pool holds the model's dtype, or float8 e4m3 (`FP8`, `model.kv_cache_dtype = "fp8"`): half
of bf16's bytes, so twice the tokens in the same memory and half of what a decode step reads
(its attention streams every row's keys and values: 2.45 of its 4.6 ms at 64 rows of ~1070
tokens for 2B on an H200). Unscaled, as vLLM's fp8 cache without calibrated scales: values are
clamped to the format's +-448 when written and widened to the queries' dtype when read. On CUDA
its kernels are checked at start-up (`attention.float8_cache_agrees`); where they disagree with
the reference the engine keeps the model's dtype, with a warning.

Pages are reference counted: a page holding a cached prefix (prefix.py) can be in several
sequences' page tables at once, read-only. When a page loses its last user, `on_unused`
may keep it (a cached prefix, still indexed) instead of freeing it; `evict` frees one such
page when an allocation finds the free list short.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

log = logging.getLogger("vlbridge.model.kv")

PAGE = 64  # tokens per page
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3 value: clamped to first, whatever a cast does beyond it


def stored(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """*x* as a pool of *dtype* keeps it."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(dtype) if dtype == FP8 else x.to(dtype)


def raw(pool: torch.Tensor) -> torch.Tensor:
    """*pool* for indexing: float8 as its bytes (torch has no CPU index kernels for float8)."""
    return pool.view(torch.uint8) if pool.dtype == FP8 else pool


def widened(picked: torch.Tensor, pool_dtype: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    """Values indexed out of `raw(pool)` as *dtype* (the queries')."""
    return (picked.view(FP8) if pool_dtype == FP8 else picked).to(dtype)


@dataclass
class SeqCache:
    """A sequence's place in the cache."""

    pages: list[int] = field(default_factory=list)
    length: int = 0  # tokens written

    def slot(self, index: int) -> int:
        return self.pages[index // PAGE] * PAGE + index % PAGE


class PagedKVCache:
    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        pages: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if pages < 2:
            raise ValueError(f"expected at least 2 pages, got {pages}")
        shape = (pages, PAGE, kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.pages = pages
        self.dtype = dtype
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self._free = list(range(pages - 1, 0, -1))  # page 0 is scratch
        self.refs = [0] * pages
        self.evict: Callable[[], bool] = lambda: False  # frees one idle cached page, if any
        self.on_unused: Callable[[int], bool] = lambda page: False  # True: kept (cached), not freed

    @staticmethod
    def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def allocate(self, seq: SeqCache, tokens: int) -> bool:
        """Give *seq* pages for *tokens* tokens in all (its pages so far count); False (and
        nothing taken) if full. Idle cached pages are evicted as needed."""
        need = -(-tokens // PAGE) - len(seq.pages)
        while need > len(self._free):
            if not self.evict():
                return False
        for _ in range(max(0, need)):
            page = self._free.pop()
            self.refs[page] = 1
            seq.pages.append(page)
        return True

    def free(self, seq: SeqCache) -> None:
        """Drop *seq*'s references; a page nobody uses is kept by `on_unused` or freed. The last
        pages go first, so a cache evicting its oldest idle pages evicts a prefix's tail first."""
        for page in reversed(seq.pages):
            self.drop(page)
        seq.pages = []
        seq.length = 0

    def drop(self, page: int) -> None:
        """Drop one reference to *page*; without users it is kept by `on_unused` or freed."""
        self.refs[page] -= 1
        if self.refs[page] == 0 and not self.on_unused(page):
            self._free.append(page)

    def release_page(self, page: int) -> None:
        """An idle cached page that was evicted: free again."""
        self._free.append(page)

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store keys/values (tokens, kv_heads, head_dim) at flat *slots* (tokens,)."""
        flat = (-1, self.kv_heads, self.head_dim)
        dtype = self.dtype
        raw(self.keys[layer]).view(flat).index_copy_(0, slots, raw(stored(keys, dtype)))
        raw(self.values[layer]).view(flat).index_copy_(0, slots, raw(stored(values, dtype)))

    def gather(
        self, layer: int, slots: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer *layer*'s keys and values at flat *slots*, as *dtype*: (tokens, kv_heads, head_dim) each."""
        flat = (-1, self.kv_heads, self.head_dim)
        keys = raw(self.keys[layer]).view(flat).index_select(0, slots)
        values = raw(self.values[layer]).view(flat).index_select(0, slots)
        return widened(keys, self.dtype, dtype), widened(values, self.dtype, dtype)

    def copy(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Every layer's keys and values at flat slots *source* into slots *target*."""
        flat = (-1, self.kv_heads, self.head_dim)
        for pool in (*self.keys, *self.values):
            view = raw(pool).view(flat)
            view.index_copy_(0, target, view.index_select(0, source))
