"""The prefill forward: new prompts' tokens packed one after another, keys/values straight into pages.

transformers' own forward needs a left-padded batch and a dense cache: every prefill padded to
its longest row, a reused prefix gathered out of the pages into per-layer tensors of a new width
(and concatenated again by its cache object), the new keys/values copied back into pages after,
and ~30 kernel launches per layer from Python. On an H200 its host time was as long as its device
time (2B: ~50 ms of host for ~3 pictures, 40 ms for a single 1047-token prompt), so the GPU waited
for Python, and every decode step waited for the prefill.

Here, like the decode step (decode.py), the checkpoint's own modules run in transformers' order
over the packed tokens (T rows of hidden state, no padding): each layer writes the new tokens'
keys/values into their pages at once, then attention reads each row's whole sequence (its reused
prefix and its new tokens, gathered from the pages) with a bottom-right causal mask, in one
variable-length flash-attention call on CUDA (flash.py, torch's FA2) or row by row with SDPA
(CPU, or a torch that lacks it). On CUDA the layer is the decode step's fused layer (text.py,
kernels.py): ~9 launches per layer. Pictures' encoder outputs replace their placeholder tokens'
embeddings and their deepstack features are added after the first layers, as transformers does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import torch

from .flash import Varlen, attention_by_rows, varlen_attention
from .kvcache import PagedKVCache
from .prefill_graphs import PrefillGraphs
from .text import TextModel

log = logging.getLogger("vlbridge.model.prefill")


@dataclass
class Packed:
    """A prefill's rows, packed: the tokens each row prefills (those the prefix cache did not
    supply), row after row. Tensors on the model's device, except the Python lists."""

    ids: torch.Tensor  # (T,) token ids
    positions: torch.Tensor  # (3, T) M-RoPE positions
    store: torch.Tensor  # (T,) flat cache slot of each new token
    gather: torch.Tensor  # (K,) flat cache slots of each row's whole sequence, row after row
    copy_from: torch.Tensor | None  # (C,) slots of a shared page's tokens a row continues in its own page
    copy_to: torch.Tensor | None
    pictures: torch.Tensor | None  # (P,) indexes of picture tokens in the packed order
    last: torch.Tensor  # (rows,) index of each row's last token
    query_starts: list[int]  # rows + 1 cumulative new-token counts
    key_starts: list[int]  # rows + 1 cumulative sequence lengths
    starts: torch.Tensor  # (2, rows + 1) int32: query_starts and key_starts on the device
    max_query: int  # the most new tokens of a row (or a bound on it)
    max_key: int  # the longest sequence of a row (or a bound on it)
    host: dict[str, torch.Tensor] = field(default_factory=dict)  # the inputs on the CPU, by name


def pack(
    rows: list[tuple[list[int], torch.Tensor, torch.Tensor, int]],
    copies: list[tuple[torch.Tensor, torch.Tensor]],
    image_token_id: int,
    device: torch.device,
) -> Packed:
    """*rows*: (the row's new token ids, their (3, n) positions, the row's flat cache slots for its
    whole sequence (reused prefix, then new tokens), how many of those the prefix cache supplied).
    *copies*: (from, to) slots. Host tensors are built here and sent in one copy."""
    ids = torch.tensor([t for new, _, _, _ in rows for t in new], dtype=torch.long)
    positions = torch.cat([p for _, p, _, _ in rows], dim=1)
    gather = torch.cat([slots for _, _, slots, _ in rows])
    store = torch.cat([slots[reused:] for _, _, slots, reused in rows])
    query_starts, key_starts = [0], [0]
    for new, _, slots, _ in rows:
        query_starts.append(query_starts[-1] + len(new))
        key_starts.append(key_starts[-1] + len(slots))
    pictures = (ids == image_token_id).nonzero().flatten()
    last = torch.tensor(query_starts[1:], dtype=torch.long) - 1
    copy_from = torch.cat([c[0] for c in copies]) if copies else torch.zeros(0, dtype=torch.long)
    copy_to = torch.cat([c[1] for c in copies]) if copies else torch.zeros(0, dtype=torch.long)
    starts = torch.tensor([query_starts, key_starts], dtype=torch.long).flatten()
    positions = positions.long()
    parts = [ids, positions.flatten(), store, gather, copy_from, copy_to, pictures, last, starts]
    flat = torch.cat(parts).to(device, non_blocking=True)
    sizes = [p.numel() for p in parts]
    ids_d, pos_d, store_d, gather_d, from_d, to_d, pic_d, last_d, starts_d = torch.split(flat, sizes)
    return Packed(
        ids=ids_d,
        positions=pos_d.view(3, -1),
        store=store_d,
        gather=gather_d,
        copy_from=from_d if copies else None,
        copy_to=to_d if copies else None,
        pictures=pic_d if pictures.numel() else None,
        last=last_d,
        query_starts=query_starts,
        key_starts=key_starts,
        starts=starts_d.view(2, -1).int(),
        max_query=max(b - a for a, b in pairwise(query_starts)),
        max_key=max(b - a for a, b in pairwise(key_starts)),
        host={
            "ids": ids,
            "positions": positions,
            "store": store,
            "gather": gather,
            "pictures": pictures,
            "last": last,
        },
    )


class PrefillForward(TextModel):
    """Runs packed prefills of the model's language part over the paged cache (see module doc)."""

    def __init__(self, model: Any, cache: PagedKVCache) -> None:
        super().__init__(model, cache)
        self.fused = self.cuda and hasattr(self.layers[0].self_attn, "qkv_weight")
        self.varlen: Varlen | None = None
        if self.cuda:
            keys = self.cache.keys[0]
            found = varlen_attention(
                self.heads,
                self.kv_heads,
                self.head_dim,
                self.scale,
                causal=True,
                device=keys.device,
                dtype=keys.dtype,
                fa4=False,
            )
            if found is not None:
                self.varlen = found[1]
            log.info("prefill attention: %s", found[0] if found else "SDPA row by row")
        self.graphs: PrefillGraphs | None = None  # set at warm-up (model_engine.py)

    def _attend(self, q: torch.Tensor, layer: int, batch: Packed) -> torch.Tensor:
        flat = (-1, self.kv_heads, self.head_dim)
        k = self.cache.keys[layer].view(flat).index_select(0, batch.gather)
        v = self.cache.values[layer].view(flat).index_select(0, batch.gather)
        if self.varlen is not None:
            return self.varlen(q, k, v, batch.starts[0], batch.starts[1], batch.max_query, batch.max_key)
        return attention_by_rows(q, k, v, batch.query_starts, batch.key_starts, self.scale)

    @torch.inference_mode()
    def run(
        self,
        batch: Packed,
        embeds: torch.Tensor | None,
        deepstack: list[torch.Tensor],
        every_position: bool = False,
    ) -> torch.Tensor:
        """Logits (float) of each row's last token (rows, vocab), or of every token (T, vocab).
        *embeds*: the pictures' encoder outputs, in the order of their tokens; *deepstack*: the
        features added after the first layers, same order. A batch a CUDA graph takes replays it
        (prefill_graphs.py): its logits are valid until the next prefill."""
        if batch.copy_from is not None and batch.copy_to is not None:
            flat = (-1, self.kv_heads, self.head_dim)
            for keys, values in zip(self.cache.keys, self.cache.values, strict=True):
                keys.view(flat).index_copy_(
                    0, batch.copy_to, keys.view(flat).index_select(0, batch.copy_from)
                )
                values.view(flat).index_copy_(
                    0, batch.copy_to, values.view(flat).index_select(0, batch.copy_from)
                )
        if not every_position and self.graphs is not None:
            logits = self.graphs.run(batch, embeds, deepstack)
            if logits is not None:
                return logits
        return self.logits(batch, embeds, deepstack, every_position)

    def logits(
        self,
        batch: Packed,
        embeds: torch.Tensor | None,
        deepstack: list[torch.Tensor],
        every_position: bool = False,
    ) -> torch.Tensor:
        """The forward itself (`run` less the page copies and the graphs)."""
        hidden = self.embed(batch.ids)
        if embeds is not None and batch.pictures is not None:
            hidden.index_copy_(0, batch.pictures, embeds.to(hidden.dtype))
        cos, sin = self.rotary(hidden.unsqueeze(0), batch.positions.unsqueeze(1))
        cos, sin = cos[0], sin[0]  # (T, dim)
        forward = self._layers_fused if self.fused else self._layers_stock
        hidden = forward(hidden, cos, sin, batch, deepstack)
        chosen = hidden if every_position else hidden.index_select(0, batch.last)
        return self.lm_head(self.norm(chosen)).float()

    def _deepstack(self, hidden: torch.Tensor, batch: Packed, features: torch.Tensor) -> None:
        if batch.pictures is not None:
            hidden.index_add_(0, batch.pictures, features.to(hidden.dtype))

    def _layers_stock(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: Packed,
        deepstack: list[torch.Tensor],
    ) -> torch.Tensor:
        """The checkpoint's modules as transformers runs them (CPU; checked against its forward)."""
        from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

        tokens = hidden.shape[0]
        shape = (tokens, -1, self.head_dim)
        for index, layer in enumerate(self.layers):
            residual = hidden
            x = layer.input_layernorm(hidden)
            attn = layer.self_attn
            q = attn.q_norm(attn.q_proj(x).view(shape))
            k = attn.k_norm(attn.k_proj(x).view(shape))
            v = attn.v_proj(x).view(shape)
            q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
            self.cache.write(index, batch.store, k, v)
            hidden = residual + attn.o_proj(self._attend(q, index, batch).reshape(tokens, -1))
            mlp = layer.mlp(layer.post_attention_layernorm(hidden))
            hidden = hidden + (mlp[0] if isinstance(mlp, tuple) else mlp)
            if index < len(deepstack):
                self._deepstack(hidden, batch, deepstack[index])
        return hidden

    def _layers_fused(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: Packed,
        deepstack: list[torch.Tensor],
    ) -> torch.Tensor:
        """The decode step's fused kernels (CUDA): norms with the residual add, q/k norm + rotary +
        cache write in one kernel, SiLU*up; a layer's sum is made explicit where deepstack adds."""
        cos, sin = cos.contiguous(), sin.contiguous()
        residual: torch.Tensor | None = None
        for index in range(len(self.layers)):
            hidden, residual = self.fused_layer(
                index, hidden, residual, cos, sin, batch.store, lambda q, layer: self._attend(q, layer, batch)
            )
            if index < len(deepstack):
                hidden = hidden + residual  # transformers adds deepstack to the layer's output
                self._deepstack(hidden, batch, deepstack[index])
                residual = None
        if residual is not None:
            hidden = hidden + residual
        return hidden
