"""The checkpoint's language-model modules, as the decode step and the packed prefill run them.

Both reuse the model's own embedding, layers, norm, rotary embedding and lm_head in
transformers' order and replace only the attention (paged). On CUDA a layer is the fused
kernels of kernels.py; the two pieces both passes share are here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .kvcache import PagedKVCache


class TextModel:
    def __init__(self, model: Any, cache: PagedKVCache) -> None:
        text = model.model.language_model
        self.embed = text.embed_tokens
        self.layers = list(text.layers)
        self.norm = text.norm
        self.rotary = text.rotary_emb
        self.lm_head = model.lm_head
        self.cache = cache
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.heads = model.config.text_config.num_attention_heads
        self.kv_heads = model.config.text_config.num_key_value_heads
        self.scale = float(attn.scaling)
        self.device = cache.keys[0].device
        self.cuda = self.device.type == "cuda"

    def fused_layer(
        self,
        index: int,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        attend: Callable[[torch.Tensor, int], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder layer *index* over (tokens, hidden) with the fused kernels (CUDA): returns its
        output and the residual stream, whose sum the next layer's norm makes (None: *hidden* is
        the whole stream). *attend*(queries, index) reads the cache, where k/v went at *slots*."""
        from .kernels import rms_norm

        layer = self.layers[index]
        norm = layer.input_layernorm
        if residual is None:
            x, residual = rms_norm(hidden, norm.weight, norm.variance_epsilon), hidden
        else:
            x, residual = rms_norm(hidden, norm.weight, norm.variance_epsilon, residual)
        q = self.fused_query(index, x, cos, sin, slots)
        hidden = layer.self_attn.o_proj(attend(q, index).reshape(hidden.shape[0], -1))
        norm = layer.post_attention_layernorm
        x, residual = rms_norm(hidden, norm.weight, norm.variance_epsilon, residual)
        assert residual is not None
        return self.mlp(layer, x), residual

    def fused_query(
        self, index: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor
    ) -> torch.Tensor:
        """Layer *index*'s q/k/v projection, q/k RMSNorm and rotary, k/v written into the cache at
        *slots*: the queries (tokens, heads, dim). Needs `kernels.fuse_projections`."""
        from .kernels import qk_norm_rope_store

        attn = self.layers[index].self_attn
        return qk_norm_rope_store(
            attn.qkv(x),
            attn.q_norm.weight,
            attn.k_norm.weight,
            cos,
            sin,
            self.cache.keys[index],
            self.cache.values[index],
            slots,
            self.heads,
            self.kv_heads,
            self.head_dim,
            attn.q_norm.variance_epsilon,
        )

    @staticmethod
    def mlp(layer: Any, x: torch.Tensor) -> torch.Tensor:
        """The layer's MLP over (..., hidden), as (tokens, 1, hidden): a mixture-of-experts block
        wants (batch, tokens, hidden). A dense MLP runs fused where `kernels.fuse_projections`
        patched its forward."""
        out = layer.mlp(x.reshape(-1, 1, x.shape[-1]))
        return (out[0] if isinstance(out, tuple) else out).view(x.shape)
