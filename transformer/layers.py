"""Encoder and decoder layers, paper section 3.1: ``(B, T, d) -> (B, T, d)``.

Each sub-layer (attention or feed-forward) is wrapped in a residual connection, dropout
and LayerNorm. ``norm_first=False`` is the paper's post-norm, ``x = LN(x + sublayer(x))``;
``norm_first=True`` is pre-norm, ``x = x + sublayer(LN(x))``, which trains deep stacks
without warmup tricks (the stack then adds a final LayerNorm).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from transformer.attention import MultiHeadAttention
from transformer.dropout import Dropout
from transformer.feed_forward import FeedForward


class Residual(nn.Module):
    """LayerNorm, dropout and the residual connection around one sub-layer."""

    def __init__(self, d_model: int, dropout: float, norm_first: bool):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)
        self.norm_first = norm_first

    def forward(self, x: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        if self.norm_first:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, self_attn: MultiHeadAttention, feed_forward: FeedForward,
                 dropout: float, norm_first: bool = False):
        super().__init__()
        self.self_attn, self.feed_forward = self_attn, feed_forward
        self.attn_block = Residual(d_model, dropout, norm_first)
        self.ff_block = Residual(d_model, dropout, norm_first)

    def forward(self, x: Tensor, src_mask: Tensor | None) -> Tensor:
        """x (B, S, d); src_mask (B, 1, 1, S) bool, True at real tokens."""
        x = self.attn_block(x, lambda y: self.self_attn(y, y, y, src_mask))
        return self.ff_block(x, self.feed_forward)


@dataclass
class LayerCache:
    """One decoder layer's saved keys/values, each (B, h, T, d_k)."""

    self_k: Tensor | None = None  # grows by the new tokens at each step
    self_v: Tensor | None = None
    cross_k: Tensor | None = None  # computed once from the encoder output
    cross_v: Tensor | None = None


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, self_attn: MultiHeadAttention,
                 cross_attn: MultiHeadAttention, feed_forward: FeedForward,
                 dropout: float, norm_first: bool = False):
        super().__init__()
        self.self_attn, self.cross_attn, self.feed_forward = self_attn, cross_attn, feed_forward
        self.self_block = Residual(d_model, dropout, norm_first)
        self.cross_block = Residual(d_model, dropout, norm_first)
        self.ff_block = Residual(d_model, dropout, norm_first)

    def forward(self, x: Tensor, memory: Tensor, memory_mask: Tensor | None,
                cache: LayerCache | None = None) -> Tensor:
        """x (B, T, d) target states; memory (B, S, d) encoder output; memory_mask
        (B, 1, 1, S), True at real source tokens. With a cache, x holds only the new
        positions and the keys/values of earlier ones come from the cache."""
        x = self.self_block(x, lambda y: self.masked_self_attention(y, cache))
        x = self.cross_block(x, lambda y: self.cross_attention(y, memory, memory_mask, cache))
        return self.ff_block(x, self.feed_forward)

    def masked_self_attention(self, x: Tensor, cache: LayerCache | None) -> Tensor:
        if cache is None:
            return self.self_attn(x, x, x, is_causal=True)
        attn = self.self_attn
        q, k, v = attn.project_together(x, [attn.q_proj, attn.k_proj, attn.v_proj])
        if cache.self_k is not None:  # k, v: (B, h, T_new, d_k)
            k = torch.cat([cache.self_k, k], dim=2)  # (B, h, T_past + T_new, d_k)
            v = torch.cat([cache.self_v, v], dim=2)
        cache.self_k, cache.self_v = k, v
        # A single new token may see everything cached; several new ones see the past and
        # the new ones up to themselves.
        return attn.attend(x, k, v, is_causal=x.size(1) > 1, q=q)

    def cross_attention(self, x: Tensor, memory: Tensor, memory_mask: Tensor | None,
                        cache: LayerCache | None) -> Tensor:
        if cache is None:
            return self.cross_attn(x, memory, memory, memory_mask)
        if cache.cross_k is None:
            cache.cross_k, cache.cross_v = self.cross_attn.project_kv(memory, memory)
        return self.cross_attn.attend(x, cache.cross_k, cache.cross_v, memory_mask)

