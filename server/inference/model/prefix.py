"""Prefix caching: the KV pages of finished answers, found again by the prompts that start alike.

A conversation's next turn repeats the previous prompt (and most of its answer) before the
new question; the pages that hold those tokens' keys and values are kept when a sequence
ends and the next prompt starts from them instead of recomputing the vision encoder and the
whole prefill.

Content identity. Every picture expands to a run of identical `<|image_pad|>` ids, so token
ids alone cannot tell two pictures of the same size apart: a prompt's *identity* is its ids
with each picture's tokens replaced by a negative number drawn from a hash of the picture's
bytes. Keys and values also depend on positions, and Qwen3-VL's M-RoPE positions of a token
depend only on what precedes it (text after a picture is shifted by the picture's grid), so
the same identity prefix always has the same positions: a matched prefix can be reused as
it is.

Index. A page (64 tokens) is one *block*, keyed by a hash chained through the blocks before
it (vLLM's scheme), so one lookup per page walks a prompt from its start. A prompt's last
block is usually partial, and the next prompt rarely continues exactly where the answer's
tokens stood (it re-tokenizes the answer text): the block after the last full match is found
among the children of the matched chain by longest common prefix, and its first tokens are
copied into a page of the new sequence (a full page can be shared; a partial one cannot, since
the new sequence writes its next tokens there).

Never part-way into a picture: a reused prefix that would end inside a picture's tokens
stops at the picture's start, so a picture is always encoded and prefilled whole.

Memory. Pages are reference counted by the sequences using them. A cached page nobody uses
is kept on a least-recently-used list and handed out again when the pool runs short (the
deepest blocks of a chain first), so the cache only ever uses memory nothing else wants.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .kvcache import PAGE, PagedKVCache

ROOT = b""
_MAX_CHILDREN_SCANNED = 32  # candidates for the partial block after the full matches
# Shorter matches are not worth it: every prompt starts with the same few template tokens, and a
# reuse costs a gather and a prefill row with a hole in its attention mask.
MIN_REUSE = PAGE


def picture_token(digest: bytes) -> int:
    """The identity of a picture's tokens: negative, so it never equals a token id."""
    return -1 - int.from_bytes(digest[:8], "little") // 2


def block_key(parent: bytes, tokens: tuple[int, ...] | list[int]) -> bytes:
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


def _starts(ids: np.ndarray, image_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(the picture tokens, the first token of each picture) as masks over *ids*."""
    pictures = ids == image_token_id
    starts = pictures.copy()
    starts[1:] &= ~pictures[:-1]  # the first token of each run
    return pictures, starts


def picture_starts(input_ids: list[int], image_token_id: int) -> list[int]:
    """The index of each picture's first token, in order (the same picture twice: two starts)."""
    _, starts = _starts(np.asarray(input_ids, dtype=np.int64), image_token_id)
    return [int(i) for i in np.flatnonzero(starts)]


def identity(input_ids: list[int], image_token_id: int, digests: list[bytes]) -> list[int]:
    """*input_ids* with the tokens of the k-th picture replaced by `picture_token(digests[k])`.

    Pictures are the runs of *image_token_id* (consecutive pictures are separated by
    vision_end/vision_start tokens).
    """
    # numpy, not a Python loop over every token: this runs on a preparation thread, under the GIL
    # the worker and the event loop want (~1000 tokens a 1024x1024 picture).
    ids = np.asarray(input_ids, dtype=np.int64)
    pictures, starts = _starts(ids, image_token_id)
    if int(starts.sum()) != len(digests):
        raise ValueError(f"expected {len(digests)} pictures in the prompt, found {int(starts.sum())}")
    if digests:
        tokens = np.array([picture_token(digest) for digest in digests], dtype=np.int64)
        ids[pictures] = tokens[np.cumsum(starts)[pictures] - 1]
    out: list[int] = ids.tolist()
    return out


def full_block_keys(ident: list[int]) -> list[bytes]:
    """The chained key of every full block of *ident*, in order."""
    keys: list[bytes] = []
    parent = ROOT
    for start in range(0, len(ident) - PAGE + 1, PAGE):
        parent = block_key(parent, ident[start : start + PAGE])
        keys.append(parent)
    return keys


def picture_start(ident: list[int], at: int) -> int:
    """*at* moved back to the start of the picture it falls inside of (unchanged when it does not)."""
    if 0 < at < len(ident) and ident[at] < 0 and ident[at - 1] == ident[at]:
        while at > 0 and ident[at - 1] == ident[at]:
            at -= 1
    return at


@dataclass(eq=False)
class Block:
    page: int
    key: bytes
    parent: bytes
    tokens: tuple[int, ...]  # identities of the tokens it holds (fewer than PAGE: a partial block)


@dataclass
class PrefixHit:
    """What a new sequence reuses: *length* tokens, the first `len(shared)` pages as they are."""

    length: int
    shared: list[int]  # pages used as they are (full blocks)
    source: int | None  # the page whose first `length % PAGE` tokens are copied (None: none)


class PrefixCache:
    """The index of cached blocks over a `PagedKVCache`; one owner thread."""

    def __init__(self, kv: PagedKVCache) -> None:
        self.kv = kv
        self._blocks: dict[bytes, Block] = {}
        self._children: dict[bytes, dict[bytes, Block]] = {}
        self._by_page: dict[int, Block] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached pages nobody uses, oldest first
        kv.evict = self._evict
        kv.on_unused = self._unused
        self.hits = 0
        self.reused_tokens = 0
        self.evictions = 0

    @property
    def cached_pages(self) -> int:
        return len(self._by_page)

    @property
    def idle_pages(self) -> int:
        """Cached pages no sequence uses: free memory in all but name (evicted on demand)."""
        return len(self._idle)

    def match(self, ident: list[int], keys: list[bytes]) -> PrefixHit | None:
        """The longest reusable prefix of a prompt (*ident*, its `full_block_keys`), or None
        when it is shorter than `MIN_REUSE`.

        At least the prompt's last token is left to compute (its logits give the first token).
        """
        chain: list[Block] = []
        parent = ROOT
        for number, key in enumerate(keys):
            block = self._blocks.get(key)
            if block is None or block.tokens != tuple(ident[number * PAGE : (number + 1) * PAGE]):
                break
            chain.append(block)
            parent = key
        start = len(chain) * PAGE
        best, partial = 0, None
        following = ident[start : start + PAGE]
        for scanned, block in enumerate(self._children.get(parent, {}).values()):
            if scanned == _MAX_CHILDREN_SCANNED:
                break
            common = 0
            for a, b in zip(block.tokens, following, strict=False):
                if a != b:
                    break
                common += 1
            if common > best:
                best, partial = common, block
        length = picture_start(ident, min(start + best, len(ident) - 1))
        if length < MIN_REUSE:
            return None
        full = length // PAGE
        blocks = chain[:full]
        source = None
        if length % PAGE:
            source = (chain[full] if full < len(chain) else partial).page  # type: ignore[union-attr]
        return PrefixHit(length, [b.page for b in blocks], source)

    def register(self, pages: list[int], ident: list[int]) -> None:
        """Index the blocks a finished sequence wrote: *ident* holds the identities of its first
        `len(ident)` tokens (prompt, then generated tokens), stored in *pages* in order."""
        parent = ROOT
        for number in range(-(-len(ident) // PAGE)):
            tokens = tuple(ident[number * PAGE : (number + 1) * PAGE])
            key = block_key(parent, tokens)
            page = pages[number]
            known = self._blocks.get(key)
            if known is None and page not in self._by_page:
                block = Block(page, key, parent, tokens)
                self._blocks[key] = block
                self._children.setdefault(parent, {})[key] = block
                self._by_page[page] = block
            if len(tokens) < PAGE:
                break
            parent = key

    def use(self, hit: PrefixHit) -> None:
        """Take references on the pages of *hit* (before anything else is allocated)."""
        self.hits += 1
        self.reused_tokens += hit.length
        for page in [*hit.shared, *([hit.source] if hit.source is not None else [])]:
            self._idle.pop(page, None)
            self.kv.refs[page] += 1

    def clear(self) -> None:
        """Forget every idle cached page (they go back to the free pool)."""
        while self._idle:
            self._evict()

    # ---- hooks called by the KV cache -------------------------------------------------------------

    def _unused(self, page: int) -> bool:
        """A page lost its last user: keep it if it is cached (True), else it is free (False)."""
        if page not in self._by_page:
            return False
        self._idle[page] = None
        return True

    def _evict(self) -> bool:
        """Free the least recently used idle cached page; False when there is none."""
        if not self._idle:
            return False
        page, _ = self._idle.popitem(last=False)
        self.evictions += 1
        block = self._by_page.pop(page)
        del self._blocks[block.key]
        siblings = self._children.get(block.parent)
        if siblings is not None:
            siblings.pop(block.key, None)
            if not siblings:
                del self._children[block.parent]
        self.kv.release_page(page)
        return True
