"""The decode step: one new token for every running row, over the paged KV cache.

The step reuses the checkpoint's own modules (projections, norms, rotary embedding,
MLP or MoE block, lm_head) in the same order as transformers' forward, and replaces
only the attention with paged attention. After a prompt, all three M-RoPE components of
a text token's position are equal, so a row's position is one integer.

Tokens stay on the device: every sequence owns a cell of `tokens`, sampling writes the
new token there, and the next step reads its input from there. So steps N+1 and N+2 can
be launched before the host has seen step N's tokens (`steps_ahead`), and the host copy of
each step's tokens arrives asynchronously (`DeviceTokens`).

On CUDA the step for each batch-size bucket is captured once as a CUDA graph over
static buffers, removing the per-step Python and kernel-launch overhead that bounds
stock `generate`; a batch runs in the smallest bucket that holds it. Step inputs are
staged in pinned host memory (two alternating sets) and copied in one go.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from .attention import paged_attention_reference, paged_attention_triton
from .kvcache import PAGE, PagedKVCache
from .text import TextModel

log = logging.getLogger("vlbridge.model.decode")

# Rows of the staged step inputs.
CELL, POSITION, SLOT, LENGTH, BLOCKED = range(5)


def batch_buckets(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256]
    chosen = [s for s in sizes if s < max_batch]
    return [*chosen, max_batch]


class DeviceTokens:
    """Tokens of one launched step: on the device now, on the host once `tokens()` returns."""

    def __init__(self, values: torch.Tensor, host: torch.Tensor, rows: int) -> None:
        self._rows = rows
        self._host = host
        if values.device.type == "cuda":
            host[:rows].copy_(values, non_blocking=True)
            self._event: torch.cuda.Event | None = torch.cuda.Event()
            self._event.record()
        else:
            host[:rows].copy_(values)
            self._event = None

    def tokens(self) -> list[int]:
        if self._event is not None:
            self._event.synchronize()
        return [int(t) for t in self._host[: self._rows].tolist()]


class DecodeStep(TextModel):
    def __init__(
        self, model: Any, cache: PagedKVCache, max_batch: int, max_pages_per_row: int, steps_ahead: int = 1
    ) -> None:
        super().__init__(model, cache)
        self.max_batch = max_batch
        self.buckets = batch_buckets(max_batch)
        self.scratch_cell = max_batch  # padded rows read and write this token cell
        dev = self.device
        self.tokens = torch.zeros(max_batch + 1, dtype=torch.long, device=dev)
        self.inputs = torch.zeros(5, max_batch, dtype=torch.long, device=dev)
        self.table = torch.zeros(max_batch, max_pages_per_row, dtype=torch.long, device=dev)
        self.logits = torch.zeros(
            max_batch, model.config.text_config.vocab_size, dtype=torch.float32, device=dev
        )
        pin = self.cuda
        self._staged = [
            (
                torch.zeros(5, max_batch, dtype=torch.long, pin_memory=pin),
                torch.zeros(max_batch, max_pages_per_row, dtype=torch.long, pin_memory=pin),
            )
            for _ in range(steps_ahead + 1)  # a step is staged while steps_ahead are uncollected
        ]
        self._turn = 0
        self._outputs = [torch.zeros(max_batch, dtype=torch.long, pin_memory=pin) for _ in range(8)]
        self._output_turn = 0
        self._host_lengths: list[int] = []
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._layout: object = None  # whose page tables the device holds (see run)

    def output_buffer(self) -> torch.Tensor:
        """A pinned host buffer for a step's tokens (a ring: a launch never waits 8 steps uncollected)."""
        self._output_turn = (self._output_turn + 1) % len(self._outputs)
        return self._outputs[self._output_turn]

    # ---- the forward pass ---------------------------------------------------------------------------

    def _attention(self, query: torch.Tensor, layer: int, rows: int) -> torch.Tensor:
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        if self.cuda:
            return paged_attention_triton(
                query, keys, values, self.table[:rows], self.inputs[LENGTH, :rows], self.scale
            )
        return paged_attention_reference(
            query, keys, values, self.table[:rows], self._host_lengths, self.scale
        )

    def _forward(self, rows: int) -> None:
        if self.cuda:
            self._forward_fused(rows)
        else:
            self._forward_stock(rows)

    def _forward_fused(self, rows: int) -> None:
        """The CUDA step: fused kernels (kernels.py), projections fused by `fuse_projections`."""
        from .kernels import rms_norm

        hidden = self.embed(self.tokens[self.inputs[CELL, :rows]])  # (rows, hidden)
        position_ids = self.inputs[POSITION, :rows].view(1, rows, 1).expand(3, rows, 1)
        cos, sin = self.rotary(hidden.unsqueeze(1), position_ids)
        cos, sin = cos.view(rows, -1), sin.view(rows, -1)
        slots = self.inputs[SLOT, :rows]
        residual: torch.Tensor | None = None
        for index in range(len(self.layers)):
            hidden, residual = self.fused_layer(
                index, hidden, residual, cos, sin, slots, lambda q, layer: self._attention(q, layer, rows)
            )
        x, _ = rms_norm(hidden, self.norm.weight, self.norm.variance_epsilon, residual)
        self.logits[:rows] = self.lm_head(x).float()

    def _forward_stock(self, rows: int) -> None:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

        ids = self.tokens[self.inputs[CELL, :rows]]
        hidden = self.embed(ids).unsqueeze(1)  # (rows, 1, hidden)
        position_ids = self.inputs[POSITION, :rows].view(1, rows, 1).expand(3, rows, 1)
        cos, sin = self.rotary(hidden, position_ids)
        slots = self.inputs[SLOT, :rows]
        shape = (rows, 1, -1, self.head_dim)
        for index, layer in enumerate(self.layers):
            residual = hidden
            x = layer.input_layernorm(hidden)
            attn = layer.self_attn
            q = attn.q_norm(attn.q_proj(x).view(shape)).transpose(1, 2)
            k = attn.k_norm(attn.k_proj(x).view(shape)).transpose(1, 2)
            v = attn.v_proj(x).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.cache.write(index, slots, k[:, :, 0], v[:, :, 0])
            out = self._attention(q[:, :, 0].contiguous(), index, rows)  # (rows, heads, dim)
            hidden = residual + attn.o_proj(out.reshape(rows, 1, -1))
            hidden = hidden + self.mlp(layer, layer.post_attention_layernorm(hidden))
        hidden = self.norm(hidden)
        self.logits[:rows] = self.lm_head(hidden[:, 0]).float()

    # ---- running a step -----------------------------------------------------------------------------

    def bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def _stage(self, columns: list[list[int]], tables: list[list[int]] | None, width: int) -> None:
        """Copy the step inputs (CELL..BLOCKED rows, page tables) to the device in two copies;
        *tables* None: the device's page tables are those of the last step (same rows, same order)."""
        # the oldest set's copy finished: its step was collected before this launch
        self._turn = (self._turn + 1) % len(self._staged)
        inputs, table = self._staged[self._turn]
        rows = len(columns[0])
        host_inputs = inputs.numpy()
        for index, column in enumerate(columns):
            host_inputs[index, :rows] = column
        pad = slice(rows, width)
        host_inputs[CELL, pad] = self.scratch_cell
        host_inputs[POSITION, pad] = 0
        host_inputs[SLOT, pad] = 0  # scratch page 0
        host_inputs[LENGTH, pad] = 1
        host_inputs[BLOCKED, pad] = 0
        self.inputs.copy_(inputs, non_blocking=True)  # whole, contiguous buffers: one plain copy each
        if tables is not None:
            host_table = table.numpy()
            for row, pages in enumerate(tables):
                host_table[row, : len(pages)] = pages
            host_table[pad, 0] = 0
            self.table[:width].copy_(table[:width], non_blocking=True)

    @torch.inference_mode()
    def run(
        self,
        cells: list[int],
        positions: list[int],
        slots: list[int],
        lengths: list[int],
        blocked: list[int],
        tables: list[list[int]],
        layout: object = None,
    ) -> torch.Tensor:
        """Launch one step; returns its logits (rows, vocab) on the device.

        Each row reads its input token from its token cell. *lengths* include the new token.
        *layout*: a value equal to the last step's when the rows are the same sequences in the same
        order (None: unknown). Their page tables are then already on the device (a row's pages
        are all reserved at admission): restaging 64 tables was ~0.2 ms of Python per step on the
        worker thread, under the GIL.
        """
        rows = len(cells)
        width = self.bucket(rows)
        graph = self.graphs.get(width)
        if graph is None:
            width = rows
        same = layout is not None and layout == self._layout
        self._layout = None  # until this step is staged
        self._stage([cells, positions, slots, lengths, blocked], None if same else tables, width)
        self._layout = layout
        self._host_lengths = lengths
        if graph is not None:
            graph.replay()
        else:
            self._forward(rows)
        return self.logits[:rows]

    def blocked_rows(self, rows: int) -> torch.Tensor:
        return self.inputs[BLOCKED, :rows].bool()

    def cells(self, rows: int) -> torch.Tensor:
        return self.inputs[CELL, :rows]

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture one CUDA graph per bucket (largest first, sharing one memory pool); seconds taken."""
        if not self.cuda:
            return 0.0
        started = time.monotonic()
        self._layout = None  # the captures stage tables of their own
        pool = None
        for width in sorted(self.buckets, reverse=True):
            cells = [self.scratch_cell] * width
            self._stage([cells, [0] * width, [0] * width, [1] * width, [0] * width], [[0]] * width, width)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up: kernel selection, Triton compilation
                    self._forward(width)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(width)
            pool = graph.pool()
            self.graphs[width] = graph
            torch.cuda.synchronize(self.device)  # the staged inputs are reused by the next capture
        elapsed = time.monotonic() - started
        log.info("captured %d decode graphs (batch %s) in %.1f s", len(self.graphs), self.buckets, elapsed)
        return elapsed


def max_pages_per_row(max_tokens: int) -> int:
    return -(-max_tokens // PAGE)
