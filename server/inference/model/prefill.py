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
variable-length flash-attention call on CUDA (flash.py: FlashAttention 4 where installed, else
torch's FA2) or row by row with SDPA (CPU, or a torch that lacks it). On CUDA the layer is the
decode step's fused layer (text.py, kernels.py): ~9 launches per layer. Pictures' encoder
outputs replace their placeholder tokens' embeddings and their deepstack features are added
after the first layers, as transformers does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch

from .devices import send
from .flash import Varlen, attention_by_rows, varlen_attention
from .kvcache import PagedKVCache
from .prefill_graphs import PrefillGraphs
from .text import TextModel

log = logging.getLogger("vlbridge.model.prefill")


# The inputs a prefill sends to the device, in `Packed.host` and in the one copy made of them.
INPUTS = ("ids", "positions", "store", "gather", "copy_from", "copy_to", "pictures", "last")
OPTIONAL = ("copy_from", "copy_to", "pictures")  # None on the device when empty


@dataclass
class Packed:
    """A prefill's rows, packed: the tokens each row prefills (those the prefix cache did not
    supply), row after row. Its tensors are built on the CPU (`host`) and reach the model's
    device in one copy when first read: a batch a CUDA graph takes (prefill_graphs.py) stages
    `host` itself and sends only its page copies (`copies`)."""

    host: dict[str, torch.Tensor]  # INPUTS on the CPU (positions (3, T)); copies and pictures may be empty
    query_starts: list[int]  # rows + 1 cumulative new-token counts
    key_starts: list[int]  # rows + 1 cumulative sequence lengths
    max_query: int  # the most new tokens of a row (or a bound on it)
    max_key: int  # the longest sequence of a row (or a bound on it)
    device: torch.device
    sent: dict[str, torch.Tensor | None] | None = None  # the inputs on the device, once sent

    def _on_device(self) -> dict[str, torch.Tensor | None]:
        if self.sent is None:
            starts = torch.tensor([self.query_starts, self.key_starts], dtype=torch.long)
            parts = [self.host[name].flatten() for name in INPUTS] + [starts.flatten()]
            sent = torch.split(send(torch.cat(parts), self.device), [p.numel() for p in parts])
            self.sent = {
                name: None if name in OPTIONAL and not tensor.numel() else tensor
                for name, tensor in zip(INPUTS, sent[:-1], strict=True)
            }
            positions = self.sent["positions"]
            assert positions is not None
            self.sent["positions"] = positions.view(3, -1)
            self.sent["starts"] = sent[-1].view(2, -1).int()
        return self.sent

    def _tensor(self, name: str) -> torch.Tensor:
        tensor = self._on_device()[name]
        assert tensor is not None
        return tensor

    @property
    def ids(self) -> torch.Tensor:  # (T,) token ids
        return self._tensor("ids")

    @property
    def positions(self) -> torch.Tensor:  # (3, T) M-RoPE positions
        return self._tensor("positions")

    @property
    def store(self) -> torch.Tensor:  # (T,) flat cache slot of each new token
        return self._tensor("store")

    @property
    def gather(self) -> torch.Tensor:  # (K,) flat cache slots of each row's whole sequence, row after row
        return self._tensor("gather")

    def copies(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """On the device, the slots of the shared pages' tokens rows continue and their places in
        the rows' own pages, (C,) each; None without copies. A batch not sent yet sends only these:
        one a CUDA graph takes needs nothing else of it on the device."""
        if self.sent is not None:
            source, target = self.sent["copy_from"], self.sent["copy_to"]
            return None if source is None or target is None else (source, target)
        source, target = self.host["copy_from"], self.host["copy_to"]
        if not source.numel():
            return None
        sent = send(torch.cat([source, target]), self.device)
        return sent[: source.numel()], sent[source.numel() :]

    @property
    def pictures(self) -> torch.Tensor | None:  # (P,) indexes of picture tokens in the packed order
        return self._on_device()["pictures"]

    @property
    def last(self) -> torch.Tensor:  # (rows,) index of each row's last token
        return self._tensor("last")

    @property
    def starts(self) -> torch.Tensor:  # (2, rows + 1) int32: query_starts and key_starts
        return self._tensor("starts")


def pack(
    rows: list[tuple[list[int], torch.Tensor, torch.Tensor, int]],
    copies: list[tuple[torch.Tensor, torch.Tensor]],
    image_token_id: int,
    device: torch.device,
) -> Packed:
    """*rows*: (the row's new token ids, their (3, n) positions, the row's flat cache slots for its
    whole sequence (reused prefix, then new tokens), how many of those the prefix cache supplied).
    *copies*: (from, to) slots."""
    ids = torch.tensor([t for new, _, _, _ in rows for t in new], dtype=torch.long)
    query_starts, key_starts = [0], [0]
    for new, _, slots, _ in rows:
        query_starts.append(query_starts[-1] + len(new))
        key_starts.append(key_starts[-1] + len(slots))
    empty = torch.zeros(0, dtype=torch.long)
    host = {
        "ids": ids,
        "positions": torch.cat([p for _, p, _, _ in rows], dim=1).long(),
        "store": torch.cat([slots[reused:] for _, _, slots, reused in rows]),
        "gather": torch.cat([slots for _, _, slots, _ in rows]),
        "copy_from": torch.cat([c[0] for c in copies]) if copies else empty,
        "copy_to": torch.cat([c[1] for c in copies]) if copies else empty,
        "pictures": (ids == image_token_id).nonzero().flatten(),
        "last": torch.tensor(query_starts[1:], dtype=torch.long) - 1,
    }
    return Packed(
        host,
        query_starts,
        key_starts,
        max(b - a for a, b in pairwise(query_starts)),
        max(b - a for a, b in pairwise(key_starts)),
        device,
    )


class PrefillForward(TextModel):
    """Runs packed prefills of the model's language part over the paged cache (see module doc)."""

    def __init__(self, model: Any, cache: PagedKVCache) -> None:
        super().__init__(model, cache)
        self.fused = self.cuda and hasattr(self.layers[0].self_attn, "qkv")
        self.varlen: Varlen | None = None
        if self.cuda:
            found = varlen_attention(  # over keys and values widened to the queries' dtype (`_attend`)
                self.heads,
                self.kv_heads,
                self.head_dim,
                self.scale,
                causal=True,
                device=self.device,
                dtype=self.embed.weight.dtype,
            )
            if found is not None:
                self.varlen = found[1]
            log.info("prefill attention: %s", found[0] if found else "SDPA row by row")
        self.graphs: PrefillGraphs | None = None  # set at warm-up (model_engine.py)

    def _attend(self, q: torch.Tensor, layer: int, batch: Packed) -> torch.Tensor:
        k, v = self.cache.gather(layer, batch.gather, q.dtype)
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
        copies = batch.copies()
        if copies is not None:
            self.cache.copy(*copies)
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
            hidden = hidden + self.mlp(layer, layer.post_attention_layernorm(hidden))
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
