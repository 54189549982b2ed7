"""The decode step: one new token for every running row, over the paged KV cache.

The step reuses the checkpoint's own modules (projections, norms, rotary embedding,
MLP or MoE block, lm_head) in the same order as transformers' forward, and replaces
only the attention with paged attention. After a prompt, all three M-RoPE components of
a text token's position are equal, so a row's position is one integer.

On CUDA the step for each batch-size bucket is captured once as a CUDA graph over
static input buffers, removing the per-step Python and kernel-launch overhead that
bounds stock `generate`; a batch runs in the smallest bucket that holds it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from .attention import paged_attention_reference, paged_attention_triton
from .kvcache import PAGE, PagedKVCache

log = logging.getLogger("vlbridge.model.decode")


def batch_buckets(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256]
    chosen = [s for s in sizes if s < max_batch]
    return [*chosen, max_batch]


class DecodeStep:
    def __init__(self, model: Any, cache: PagedKVCache, max_batch: int, max_pages_per_row: int) -> None:
        text = model.model.language_model
        self.embed = text.embed_tokens
        self.layers = list(text.layers)
        self.norm = text.norm
        self.rotary = text.rotary_emb
        self.lm_head = model.lm_head
        self.cache = cache
        attn = self.layers[0].self_attn
        self.heads = model.config.text_config.num_attention_heads
        self.head_dim = attn.head_dim
        self.scale = float(attn.scaling)
        self.device = cache.keys[0].device
        self.max_batch = max_batch
        self.buckets = batch_buckets(max_batch)
        self.use_triton = self.device.type == "cuda"
        dev, i32 = self.device, torch.int32
        self.ids = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.slots = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.lengths = torch.ones(max_batch, dtype=i32, device=dev)
        self.table = torch.zeros(max_batch, max_pages_per_row, dtype=i32, device=dev)
        self.logits = torch.zeros(
            max_batch, model.config.text_config.vocab_size, dtype=torch.float32, device=dev
        )
        self._host_lengths: list[int] = []
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    # ---- the forward pass ---------------------------------------------------------------------------

    def _attention(self, query: torch.Tensor, layer: int, rows: int) -> torch.Tensor:
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        if self.use_triton:
            return paged_attention_triton(
                query, keys, values, self.table[:rows], self.lengths[:rows], self.scale
            )
        return paged_attention_reference(
            query, keys, values, self.table[:rows], self._host_lengths, self.scale
        )

    def _forward(self, rows: int) -> None:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

        hidden = self.embed(self.ids[:rows]).unsqueeze(1)  # (rows, 1, hidden)
        position_ids = self.positions[:rows].view(1, rows, 1).expand(3, rows, 1)
        cos, sin = self.rotary(hidden, position_ids)
        slots = self.slots[:rows]
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
            mlp = layer.mlp(layer.post_attention_layernorm(hidden))
            hidden = hidden + (mlp[0] if isinstance(mlp, tuple) else mlp)
        hidden = self.norm(hidden)
        self.logits[:rows] = self.lm_head(hidden[:, 0]).float()

    # ---- running a step -----------------------------------------------------------------------------

    def bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def _fill(
        self,
        ids: list[int],
        positions: list[int],
        slots: list[int],
        tables: list[list[int]],
        lengths: list[int],
        width: int,
    ) -> None:
        rows = len(ids)
        pad = width - rows
        host = torch.tensor(
            [*ids, *([0] * pad), *positions, *([0] * pad), *slots, *([0] * pad)], dtype=torch.long
        ).view(3, width)
        self.ids[:width].copy_(host[0], non_blocking=True)
        self.positions[:width].copy_(host[1], non_blocking=True)
        self.slots[:width].copy_(host[2], non_blocking=True)  # padded rows write into scratch page 0
        pages = max(len(t) for t in tables)
        table = torch.zeros(width, pages, dtype=torch.int32)
        for row, pages_of_row in enumerate(tables):
            table[row, : len(pages_of_row)] = torch.tensor(pages_of_row, dtype=torch.int32)
        self.table[:width, :pages].copy_(table, non_blocking=True)
        self.lengths[:width].copy_(
            torch.tensor([*lengths, *([1] * pad)], dtype=torch.int32), non_blocking=True
        )
        self._host_lengths = lengths

    @torch.inference_mode()
    def run(
        self,
        ids: list[int],
        positions: list[int],
        slots: list[int],
        tables: list[list[int]],
        lengths: list[int],
    ) -> torch.Tensor:
        """Logits (rows, vocab) for the next token of each row. *lengths* include the new token."""
        rows = len(ids)
        graph = self.graphs.get(self.bucket(rows))
        width = self.bucket(rows) if graph is not None else rows
        self._fill(ids, positions, slots, tables, lengths, width)
        if graph is not None:
            graph.replay()
        else:
            self._forward(rows)
        return self.logits[:rows]

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture one CUDA graph per bucket (largest first, sharing one memory pool); seconds taken."""
        if self.device.type != "cuda":
            return 0.0
        started = time.monotonic()
        pool = None
        for width in sorted(self.buckets, reverse=True):
            self._fill([0] * width, [0] * width, [0] * width, [[0]] * width, [1] * width, width)
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
        torch.cuda.synchronize(self.device)
        elapsed = time.monotonic() - started
        log.info("captured %d decode graphs (batch %s) in %.1f s", len(self.graphs), self.buckets, elapsed)
        return elapsed


def max_pages_per_row(max_tokens: int) -> int:
    return -(-max_tokens // PAGE)
