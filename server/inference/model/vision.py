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
from transformers import AttentionInterface
from transformers.vision_utils import (
    get_vision_cu_seqlens,
    get_vision_interpolation_indices_and_weights,
    get_vision_position_ids,
)

from .devices import send
from .flash import FA4, varlen_attention
from .pixels import Decoded, patches
from .vision_graphs import VisionGraphs

# CUDA graphs for batches of up to 8 pictures and 32768 patches (8 pictures of 1024x1024); larger
# batches, rare and with their launches spread over more work, run eagerly.
GRAPH_PICTURES = 8
GRAPH_PATCHES = 32768

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


def patch_embed_as_linear(visual: Any) -> None:
    """Run the patch embedding as one GEMM: its Conv3d's kernel equals its stride and covers a whole
    patch, so it is a linear map of the flattened patch (the same sums). On an H200 cuDNN ran it as
    an implicit-GEMM convolution without tensor cores: 2.5 ms for 4 pictures of 1024x1024, ~5% of
    the encoder (bench/profile_prefill.py)."""
    embed = getattr(visual, "patch_embed", None)
    proj = getattr(embed, "proj", None)
    if embed is None or not isinstance(proj, torch.nn.Conv3d):
        return
    if proj.kernel_size != proj.stride or proj.padding != (0, 0, 0):
        return
    weight = proj.weight.view(proj.weight.shape[0], -1)  # a view: (embed, C*T*P*P)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.reshape(-1, weight.shape[1]).to(weight.dtype), weight, proj.bias)

    embed.forward = forward


# An attention implementation for transformers: its name has "flash" in it, so the encoder passes
# it all pictures at once with their offsets (`cu_seqlens`) instead of calling it once per picture.
VARLEN_ATTENTION = "vlbridge_varlen_flash"


def varlen_vision_attention(visual: Any) -> str | None:
    """On CUDA, the encoder's attention as one variable-length flash call per layer for all its
    pictures (flash.py: FlashAttention 4 where installed, 1.7x torch's FA2 per picture on an H200;
    attention was half of the encoder's device time); its name, or None (CPU: SDPA per picture)."""
    config = visual.config
    weight = next(visual.parameters())
    heads = int(config.num_heads)
    dim = int(config.hidden_size) // heads
    found = varlen_attention(
        heads, heads, dim, dim**-0.5, causal=False, device=weight.device, dtype=weight.dtype
    )
    if found is None:
        return None
    name, attend = found

    def forward(  # transformers' attention-function signature
        module: Any,
        query: torch.Tensor,  # (1, heads, tokens, dim)
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        assert cu_seq_lens_q is not None and cu_seq_lens_k is not None
        assert max_length_q is not None and max_length_k is not None
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
        return attend(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k).unsqueeze(0), None

    AttentionInterface.register(VARLEN_ATTENTION, forward)
    config._attn_implementation = VARLEN_ATTENTION
    return name


class VisionEncoder:
    """Encodes pictures for prefill with the checkpoint's own encoder modules: outputs kept by
    picture hash; on CUDA its attention one variable-length call per layer for all pictures, its
    blocks' elementwise work fused (vision_blocks.py) and the whole encoder replayed as CUDA
    graphs (vision_graphs.py)."""

    def __init__(self, model: Any, budget_bytes: int, graphs: bool = False) -> None:
        self._model = model
        visual = model.model.visual
        patch_embed_as_linear(visual)
        attention = varlen_vision_attention(visual)
        if attention is not None:
            log.info("vision attention: %s, all pictures in one call per layer", attention)
        if next(visual.parameters()).device.type == "cuda":
            from .vision_blocks import fuse_vision_blocks  # Triton: imported on CUDA only

            if fuse_vision_blocks(visual):
                log.info("vision blocks: LayerNorms, residual adds and GELU fused")
        # CUDA graphs need the varlen attention (the SDPA path splits by offsets on the host), and
        # FlashAttention 4's: it sizes its grid by the tokens, torch's FA2 by the longest segment
        # times the segments, which a graph's fixed offsets would inflate ~9 times.
        limit = GRAPH_PATCHES if graphs and attention == FA4 else 0
        self.graphs = VisionGraphs(visual, limit, GRAPH_PICTURES)
        self.budget = budget_bytes
        self._cache: OrderedDict[bytes, Encoded] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.precompute = True  # see _run; off for good if this transformers refuses the tensors
        self._grids: OrderedDict[tuple[int, ...], dict[str, torch.Tensor]] = OrderedDict()

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
        host-device syncs: for the rotary positions and the position-embedding taps (kept per
        grid size, `_grid_inputs`), one per layer for the attention's per-picture split (its
        SDPA path splits by `cu_seqlens.tolist()`), one for the output split. Each sync leaves the
        GPU idle while the host launches the next layer's kernels (and waits for any decode step
        queued before the prefill). Same values, same results.
        """
        visual = self._model.model.visual
        grid = torch.cat([p.grid for p in pictures])
        pixels = patches([p.decoded for p in pictures], device, dtype)
        try:
            return self._encode(visual, pixels, grid, device)
        except (RuntimeError, TypeError, ValueError):  # e.g. a device mismatch: raised at launch
            log.warning("the vision encoder refused precomputed grid tensors; using its own", exc_info=True)
            self.precompute = False
            return self._stock(pictures, device, dtype)

    def _encode(
        self, visual: Any, pixels: torch.Tensor, grid: torch.Tensor, device: torch.device
    ) -> tuple[tuple[torch.Tensor, ...], list[tuple[torch.Tensor, ...]]]:
        per_picture = [self._grid_inputs(visual, tuple(int(v) for v in g.tolist())) for g in grid]
        precomputed: dict[str, Any] = {  # ~256 KB a picture: from pageable memory the copy could wait
            name: send(torch.cat([entry[name] for entry in per_picture]), device) for name in per_picture[0]
        }
        cu_seqlens = get_vision_cu_seqlens(grid)
        sizes = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        varlen = "flash" in str(getattr(visual.config, "_attn_implementation", ""))

        def eager() -> tuple[torch.Tensor, list[torch.Tensor]]:
            kwargs = dict(precomputed)
            if varlen:
                kwargs.update(cu_seqlens=cu_seqlens.to(device, non_blocking=True), max_seqlen=max(sizes))
            else:
                kwargs["cu_seqlens"] = cu_seqlens  # stays on the CPU: only split by
            out = visual(pixels, grid_thw=grid.to(device, non_blocking=True), return_dict=True, **kwargs)
            return out.pooler_output, list(out.deepstack_features)

        merged, deepstack = self.graphs.run(pixels, precomputed, sizes, eager)
        tokens = [size // int(visual.spatial_merge_size) ** 2 for size in sizes]
        return torch.split(merged, tokens), [torch.split(level, tokens) for level in deepstack]

    @torch.inference_mode()
    def warm_up_graphs(self, device: torch.device, dtype: torch.dtype) -> int:
        """Capture the encoder's graphs for every padded size now (see vision_graphs.py), each checked
        on two random pictures of half its patches; how many there are."""
        visual = self._model.model.visual
        width = visual.patch_embed.proj.weight[0].numel()  # values per patch
        generator = torch.Generator(device=device).manual_seed(0)
        for padded in self.graphs.buckets():
            if not self.graphs.enabled:  # off (CPU, another attention), or a graph failed its check
                break
            half = padded // 2  # 32 rows of patches: an even grid for the 2x2 merge
            grid = torch.tensor([[1, 32, half // 32]] * 2)
            pixels = torch.randn(padded, width, device=device, dtype=dtype, generator=generator)
            self._encode(visual, pixels, grid, device)
        return self.graphs.captured

    def _grid_inputs(self, visual: Any, grid: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """What the encoder derives from one picture's grid, on the CPU, kept by grid size (pictures of
        one size share it): its rotary position ids and the taps and weights that resample the
        learned position embeddings to its grid. From a device grid these cost host-device syncs
        (`repeat_interleave` needs its output's size): 7 per call on an H200, each one waiting for
        everything queued before the prefill."""
        entry = self._grids.get(grid)
        if entry is None:
            tensor = torch.tensor([grid])
            entry = {"position_ids": get_vision_position_ids(tensor, int(visual.spatial_merge_size))}
            if hasattr(visual, "num_grid_per_side") and hasattr(visual, "interpolation_mode"):
                indices, weights = get_vision_interpolation_indices_and_weights(
                    tensor,
                    num_grid_per_side=visual.num_grid_per_side,
                    mode=visual.interpolation_mode,
                    align_corners=visual.interpolation_align_corners,
                    spatial_merge_size=visual.config.spatial_merge_size,
                )
                entry.update(interp_indices=indices, interp_weights=weights)
            self._grids[grid] = entry
            if len(self._grids) > 256:
                self._grids.popitem(last=False)
        else:
            self._grids.move_to_end(grid)
        return entry

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
