"""Multi-head attention: the seed's six steps, paper section 3.2.

``MultiHeadAttention`` maps ``query (B, Tq, d)``, ``key``/``value (B, Tk, d)`` to
``(B, Tq, d)``. Two paths compute the same function:

* the fast path hands steps 2-6 to ``F.scaled_dot_product_attention`` (fused flash /
  memory-efficient kernels on GPU);
* the explicit path spells every step out and can return the attention weights
  ``(B, h, Tq, Tk)``, for heat maps and for teaching.

Masks are boolean and **True where attention is allowed**, broadcastable to
``(B, h, Tq, Tk)`` (the same convention as ``scaled_dot_product_attention``).

``forward(query, key, value, mask, is_causal=..., cache=...)`` is what the layers call; any
module with that call plugs in as ``model/attention`` (docs/extending.md). With a
``KVCache`` (incremental decoding), self-attention appends the new keys/values to it and
cross-attention projects the encoder output once. Positions that act inside attention
(``model/positional=rope`` or ``alibi``) come in as ``positions``: it rotates the queries and
keys of step 1 and may add a bias to the scores of step 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class KVCache:
    """One attention module's keys and values saved across incremental decoding steps,
    each (B, h, T, d_k). Beam search reorders dim 0 of every tensor held here, so an
    attention module of one's own may keep other tensors on it too, batch first."""

    k: Tensor | None = None
    v: Tensor | None = None


class MultiHeadAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True,
                 positions: nn.Module | None = None):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(
                f"d_model={d_model} must be divisible by n_heads={n_heads} "
                "(each head works in d_model/n_heads dimensions)"
            )
        check_dropout("dropout", dropout)
        self.d_model, self.n_heads, self.d_k = d_model, n_heads, d_model // n_heads
        self.dropout = dropout
        # The h per-head projections of size d_k, stored side by side in one matrix each.
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)  # W_O
        # RoPE or ALiBi (transformer/rotary.py, alibi.py): used by self-attention only.
        self.positions = positions
        # When True, forward takes the explicit path and keeps the weights in
        # ``last_weights`` (see ``transformer.model.attention_maps``).
        self.keep_weights = False
        self.last_weights: Tensor | None = None

    def split_heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.d_k).transpose(1, 2)  # (B, h, T, d_k)

    def project_kv(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Step 1 for keys and values: (B, Tk, d) -> two (B, h, Tk, d_k)."""
        if key is value:
            return self.project_together(key, [self.k_proj, self.v_proj])
        return self.split_heads(self.k_proj(key)), self.split_heads(self.v_proj(value))

    def project_together(self, x: Tensor, projections: list[nn.Linear]) -> tuple[Tensor, ...]:
        """Several projections of the same x in one matrix product (fewer, larger products
        run faster): (B, T, d) -> one (B, h, T, d_k) each."""
        weight = torch.cat([p.weight for p in projections])  # (n * d, d)
        bias = None if projections[0].bias is None else torch.cat([p.bias for p in projections])
        out = F.linear(x, weight, bias)  # (B, T, n * d)
        return tuple(self.split_heads(y) for y in out.split(self.d_model, dim=-1))

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        mask: Tensor | None = None,
        need_weights: bool = False,
        is_causal: bool = False,
        cache: KVCache | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """query (B, Tq, d), key/value (B, Tk, d) -> (B, Tq, d). ``is_causal``: the Tq
        queries are the last Tq of the Tk positions, and none may see a later one."""
        q, k, v = self.project(query, key, value, cache)  # step 1
        out, weights = self.attend(q, k, v, mask, is_causal, need_weights or self.keep_weights)
        if self.keep_weights:
            self.last_weights = weights.detach()
        B, _, Tq, _ = out.shape
        # Concatenate the heads, then W_O.
        out = self.out_proj(out.transpose(1, 2).reshape(B, Tq, self.d_model))  # (B, Tq, d)
        return (out, weights) if need_weights else out

    def project(self, query: Tensor, key: Tensor, value: Tensor, cache: KVCache | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        """Step 1: q (B, h, Tq, d_k) and k, v (B, h, Tk, d_k). Self-attention (query is key
        is value) projects all three in one product, gives q and k their positions (RoPE)
        and, with a cache, appends k and v to the earlier ones; cross-attention projects
        the encoder output once and keeps it in the cache."""
        if query is key and key is value:
            q, k, v = self.project_together(query, [self.q_proj, self.k_proj, self.v_proj])
            past = 0 if cache is None or cache.k is None else cache.k.size(2)
            if self.positions is not None:  # the new tokens are at positions past, past + 1...
                q, k = self.positions.rotate(q, k, past)
            if cache is not None:
                if past:
                    k = torch.cat([cache.k, k], dim=2)  # (B, h, T_past + T_new, d_k)
                    v = torch.cat([cache.v, v], dim=2)
                cache.k, cache.v = k, v
            return q, k, v
        q = self.split_heads(self.q_proj(query))  # (B, h, Tq, d_k)
        if cache is not None and cache.k is not None:
            return q, cache.k, cache.v
        k, v = self.project_kv(key, value)
        if cache is not None:
            cache.k, cache.v = k, v
        return q, k, v

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None = None,
        is_causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Steps 2-6 on projected q (B, h, Tq, d_k) and k, v (B, h, Tk, d_k) -> the heads'
        outputs (B, h, Tq, d_k) and, if ``need_weights``, the weights (B, h, Tq, Tk)."""
        # A lone newest query may see every key: only several queries need the causal mask.
        causal = causal_mask(q.size(2), k.size(2), q.device) if is_causal and q.size(2) > 1 \
            else None
        # ALiBi: a bias on the scores of self-attention (None for every other part).
        bias = self.positions.bias(q, k) if self.positions is not None else None
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            return explicit_attention(q, k, v, both(mask, causal), dropout_p, bias)
        if causal is not None and mask is None and bias is None and q.size(2) == k.size(2):
            # Steps 2-6 in one fused kernel; a lone square causal mask goes in as a flag so
            # that the flash kernel can be used (the flag means top-left alignment).
            return fused_attention(q, k, v, None, dropout_p, is_causal=True), None
        mask = both(mask, causal)
        if bias is not None:  # the bias and the mask as one additive mask (B, h, Tq, Tk)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        return fused_attention(q, k, v, mask, dropout_p, is_causal=False), None


def both(mask: Tensor | None, causal: Tensor | None) -> Tensor | None:
    """Where both masks allow attention (either may be None: no restriction)."""
    if mask is None or causal is None:
        return causal if mask is None else mask
    return mask & causal


def fused_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float,
                    is_causal: bool) -> Tensor:
    """``F.scaled_dot_product_attention``, except under CPU bf16 autocast, where it runs in
    float32: the CPU flash kernel's bf16 backward is about 5x slower than its float32 one
    at our sizes (docs/benchmarks.md), and these products are a small part of the FLOPs."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        if mask is not None and mask.is_floating_point():
            mask = mask.float()
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), mask,
                                                 dropout_p, is_causal)
        return out.to(torch.get_autocast_dtype("cpu"))
    if mask is not None and mask.is_floating_point():  # an additive mask in q's dtype
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=is_causal)


def explicit_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, dropout_p: float = 0.0,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The seed's steps 2-6, one line each. q (B,h,Tq,d_k), k/v (B,h,Tk,d_k); ``bias``
    (h, Tq, Tk) is added to the scaled scores (ALiBi)."""
    scores = q @ k.transpose(-2, -1)  # step 2: q . k for every pair, (B, h, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # step 3: optional mask
    scores = scores / math.sqrt(q.size(-1))  # step 4: scale by 1/sqrt(d_k), section 3.2.1
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    weights = scores.softmax(dim=-1)  # step 5: a distribution over the keys of each query
    attended = F.dropout(weights, p=dropout_p) @ v  # step 6: weighted sum of the values
    return attended, weights


def causal_mask(n_queries: int, n_keys: int, device: torch.device | None = None) -> Tensor:
    """(Tq, Tk) bool, True where query i (at position Tk - Tq + i) may see key j: no
    position sees its future."""
    return torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).tril(n_keys - n_queries)


def check_dropout(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value} must be in [0, 1)")
