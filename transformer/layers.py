"""Encoder and decoder layers, paper section 3.1: ``(B, T, d) -> (B, T, d)``.

Each sub-layer (attention or feed-forward) is wrapped in a residual connection, dropout
and LayerNorm. ``norm_first=False`` is the paper's post-norm, ``x = LN(x + sublayer(x))``;
``norm_first=True`` is pre-norm, ``x = x + sublayer(LN(x))``, which trains deep stacks
without warmup tricks (the stack then adds a final LayerNorm). ``norm`` builds the norm
from the size (``model/norm``: LayerNorm or RMSNorm); the layers receive their attention
and feed-forward modules built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, nn

from transformer.attention import KVCache
from transformer.dropout import Dropout

Norm = Callable[[int], nn.Module]  # size -> a norm over the last dimension


class Residual(nn.Module):
    """LayerNorm, dropout and the residual connection around one sub-layer."""

    def __init__(self, d_model: int, dropout: float, norm_first: bool, norm: Norm = nn.LayerNorm):
        super().__init__()
        self.norm = norm(d_model)
        self.dropout = Dropout(dropout)
        self.norm_first = norm_first

    def forward(self, x: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        if self.norm_first:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, self_attn: nn.Module, feed_forward: nn.Module,
                 dropout: float, norm_first: bool = False, norm: Norm = nn.LayerNorm):
        super().__init__()
        self.self_attn, self.feed_forward = self_attn, feed_forward
        self.attn_block = Residual(d_model, dropout, norm_first, norm)
        self.ff_block = Residual(d_model, dropout, norm_first, norm)

    def forward(self, x: Tensor, src_mask: Tensor | None) -> Tensor:
        """x (B, S, d); src_mask (B, 1, 1, S) bool, True at real tokens."""
        x = self.attn_block(x, lambda y: self.self_attn(y, y, y, src_mask))
        return self.ff_block(x, self.feed_forward)


@dataclass
class LayerCache:
    """One decoder layer's saved keys/values."""

    self_attn: KVCache = field(default_factory=KVCache)  # grows by the new tokens each step
    cross_attn: KVCache = field(default_factory=KVCache)  # computed once from the encoder output


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, self_attn: nn.Module, cross_attn: nn.Module,
                 feed_forward: nn.Module, dropout: float, norm_first: bool = False,
                 norm: Norm = nn.LayerNorm):
        super().__init__()
        self.self_attn, self.cross_attn, self.feed_forward = self_attn, cross_attn, feed_forward
        self.self_block = Residual(d_model, dropout, norm_first, norm)
        self.cross_block = Residual(d_model, dropout, norm_first, norm)
        self.ff_block = Residual(d_model, dropout, norm_first, norm)

    def forward(self, x: Tensor, memory: Tensor, memory_mask: Tensor | None,
                cache: LayerCache | None = None) -> Tensor:
        """x (B, T, d) target states; memory (B, S, d) encoder output; memory_mask
        (B, 1, 1, S), True at real source tokens. With a cache, x holds only the new
        positions and the keys/values of earlier ones come from the cache."""
        self_cache = cache.self_attn if cache is not None else None
        cross_cache = cache.cross_attn if cache is not None else None
        x = self.self_block(x, lambda y: self.self_attn(y, y, y, is_causal=True,
                                                        cache=self_cache))
        x = self.cross_block(x, lambda y: self.cross_attn(y, memory, memory, memory_mask,
                                                          cache=cross_cache))
        return self.ff_block(x, self.feed_forward)
