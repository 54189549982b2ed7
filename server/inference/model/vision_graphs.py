"""CUDA graphs of the vision encoder: a prefill's pictures encoded by one graph replay.

The encoder is ~20 modules a layer launched from Python (24 layers for Qwen3-VL): on an H200 the
host spent ~21 ms launching a slice of 4-5 pictures, all of it holding the GIL the server's event
loop and preparation threads want, and a single picture's encoding was bound by the host (15 ms of
host for 11 ms of device work). A graph replays the same kernels for ~0.1 ms of host time.

A graph has fixed shapes, so batches are padded: the patches to a multiple of `STEP`, as one more
segment of the variable-length attention (the padding attends only to itself, and its outputs are
dropped), and the offsets to a fixed count (`max_pictures` + 2, empty segments after the padding:
FlashAttention 4 sizes its grid by the total of tokens, so they cost nothing); so a graph serves
every batch of its padded size. The real offsets, pixels and position inputs are copied into static
buffers (shared by all graphs, sized for the largest) before each replay; the attention reads its
offsets on the device. The outputs are copied into shared buffers at the end of the graph, so the
graphs' own memory (one pool) holds only what one encoding needs at a time. All sizes are captured
at warm-up (`VisionEncoder.warm_up_graphs`: ~32 graphs, a few seconds), each checked once against the
eager encoder on a batch of two pictures (captured with other offsets than that batch's, so a
kernel that had baked its offsets in at capture would fail the check); a failed capture or check
turns graphs off for good. A size not captured yet is captured when first met.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from .agreement import relative_error

log = logging.getLogger("vlbridge.model.vision")

STEP = 1024  # patches: graphs for multiples of this (a 1024x1024 picture is 4096)
# Encoder outputs, each (tokens, hidden): the merged embeddings, then each deepstack level.
Outputs = tuple[torch.Tensor, list[torch.Tensor]]


class VisionGraphs:
    def __init__(self, visual: Any, limit_patches: int, max_pictures: int) -> None:
        weight = next(visual.parameters())
        self.visual = visual
        self.device, self.dtype = weight.device, weight.dtype
        self.limit = limit_patches // STEP * STEP
        self.max_pictures = max_pictures
        self.enabled = self.device.type == "cuda" and self.limit > 0 and max_pictures > 0
        self.unit = int(visual.spatial_merge_size) ** 2  # patches per output token
        self.offset_dtype = torch.int32  # what the attention kernels take
        self._graphs: dict[int, Any] = {}  # torch.cuda.CUDAGraph by padded patches
        self._pool: Any = None
        self._inputs: dict[str, torch.Tensor] = {}  # static, `limit` rows each
        self._offsets = torch.zeros(max_pictures + 2, dtype=self.offset_dtype, device=self.device)
        self._out: torch.Tensor | None = None
        self._deep: list[torch.Tensor] = []
        self._grid = torch.ones(
            1, 3, dtype=torch.long, device=self.device
        )  # read by nothing: all precomputed

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def buckets(self) -> list[int]:
        return list(range(STEP, self.limit + 1, STEP))

    def key(self, sizes: list[int]) -> int | None:
        """The padded size whose graph takes pictures of *sizes* patches, if one does."""
        patches = sum(sizes)
        if not self.enabled or len(sizes) > self.max_pictures or patches > self.limit:
            return None
        return -(-patches // STEP) * STEP

    def run(
        self,
        pixels: torch.Tensor,
        inputs: dict[str, torch.Tensor],
        sizes: list[int],
        eager: Callable[[], Outputs],
    ) -> Outputs:
        """The encoder's outputs for pictures of *sizes* patches (views of shared buffers, valid until
        the next call: copy what must outlive it); *eager* runs the encoder without a graph, for
        batches no graph takes and to check a new graph."""
        key = self.key(sizes)
        if key is None:
            return eager()
        graph = self._graphs.get(key)
        if graph is None:
            expected = eager()
            try:
                graph = self._capture(key, pixels, inputs)
                self._fill(key, pixels, inputs, sizes)
                graph.replay()
                got = self._outputs(sizes)
                error = _relative_error(got, expected)
            except Exception:
                log.exception("capturing a vision-encoder CUDA graph failed; encoding eagerly from now on")
                self.enabled = False
                return expected
            if error > 0.02:
                log.warning("a vision-encoder CUDA graph differs from the encoder by %.3f; graphs off", error)
                self.enabled = False
                return expected
            self._graphs[key] = graph
            log.debug("vision-encoder CUDA graph for %d patches (%d graphs)", key, len(self._graphs))
            return got
        self._fill(key, pixels, inputs, sizes)
        graph.replay()
        return self._outputs(sizes)

    def _buffers(self, pixels: torch.Tensor, inputs: dict[str, torch.Tensor]) -> None:
        if self._inputs:
            return
        self._inputs["pixels"] = torch.zeros(
            self.limit, *pixels.shape[1:], dtype=pixels.dtype, device=self.device
        )
        for name, tensor in inputs.items():
            self._inputs[name] = torch.zeros(
                self.limit, *tensor.shape[1:], dtype=tensor.dtype, device=self.device
            )

    def _fill(
        self, key: int, pixels: torch.Tensor, inputs: dict[str, torch.Tensor], sizes: list[int]
    ) -> None:
        """The batch into the static inputs; the padding rows keep what they held (finite values,
        valid indices: they only feed the padding segment)."""
        count = sum(sizes)
        self._inputs["pixels"][:count].copy_(pixels, non_blocking=True)
        for name, tensor in inputs.items():
            self._inputs[name][:count].copy_(tensor, non_blocking=True)
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        offsets += [key] * (len(self._offsets) - len(offsets))  # the padding, then empty segments
        self._offsets.copy_(torch.tensor(offsets, dtype=self.offset_dtype), non_blocking=True)

    def _forward(self, padded: int) -> None:
        kwargs = {name: buffer[:padded] for name, buffer in self._inputs.items() if name != "pixels"}
        out = self.visual(
            self._inputs["pixels"][:padded],
            grid_thw=self._grid,
            return_dict=True,
            cu_seqlens=self._offsets,
            max_seqlen=padded,
            **kwargs,
        )
        tokens = padded // self.unit
        if self._out is None:
            self._out = torch.empty(
                self.limit // self.unit,
                out.pooler_output.shape[-1],
                dtype=out.pooler_output.dtype,
                device=self.device,
            )
            self._deep = [
                torch.empty_like(self._out[:, : level.shape[-1]]) for level in out.deepstack_features
            ]
        self._out[:tokens].copy_(out.pooler_output)
        for buffer, level in zip(self._deep, out.deepstack_features, strict=True):
            buffer[:tokens].copy_(level)

    def _capture(self, key: int, pixels: torch.Tensor, inputs: dict[str, torch.Tensor]) -> Any:
        self._buffers(pixels, inputs)
        # Captured with all pictures empty and the padding everything: see module doc.
        self._offsets.copy_(torch.tensor([0] * (len(self._offsets) - 1) + [key], dtype=self.offset_dtype))
        return self._record(key)

    def _record(self, key: int) -> Any:
        """A CUDA graph of `_forward(key)`, warmed up outside the capture first (the allocator, lazy
        initialisations, kernel compilation) as torch's documentation asks."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._forward(key)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the preparation threads pin memory meanwhile, which a global capture forbids.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            self._forward(key)
        self._pool = graph.pool()
        return graph

    def _outputs(self, sizes: list[int]) -> Outputs:
        assert self._out is not None
        tokens = sum(sizes) // self.unit
        return self._out[:tokens], [level[:tokens] for level in self._deep]


def _relative_error(got: Outputs, expected: Outputs) -> float:
    pairs = zip([got[0], *got[1]], [expected[0], *expected[1]], strict=True)
    return max(relative_error(a, b) for a, b in pairs)
