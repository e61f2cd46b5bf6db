"""ALiBi, attention with linear biases (Press, Smith & Lewis 2022, "Train Short, Test
Long", section 3): no position vectors at all; head h adds ``-m_h * distance`` to the
score of a query for a key, with the slopes m_h a geometric sequence, 2^(-8/n),
2^(-16/n), ..., 2^(-8) for n heads.

``model/positional=alibi``: nothing is added to the token embeddings (they still get the
paper's dropout, section 5.4); the model hands this module to every self-attention
(``in_attention``), which adds ``bias`` to its scaled scores. The paper's models are
decoders, where a query sees only earlier keys; our encoder sees both sides, so the
distance is |i - j| there (a symmetric use the paper does not test). Cross-attention,
between two sequences, gets no bias.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from transformer.attention import check_dropout
from transformer.dropout import Dropout


class ALiBiPositions(nn.Module):
    in_attention = True  # the model gives it to every self-attention as ``positions``

    def __init__(self, d_model: int, max_len: int, dropout: float = 0.0):
        super().__init__()
        check_dropout("dropout", dropout)
        self.max_len = max_len  # the decoding limits read it
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """The token embeddings (B, T, d), with dropout only: positions act in attention."""
        return self.dropout(x)

    def rotate(self, q: Tensor, k: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        """Queries and keys stay as they are: the bias carries the positions."""
        return q, k

    def bias(self, q: Tensor, k: Tensor) -> Tensor:
        """(h, Tq, Tk) float32: -slope_h * |i - j| for query i and key j, the Tq queries
        being the last Tq of the Tk positions (one new query while decoding with a cache)."""
        n_heads, n_queries, n_keys = q.size(1), q.size(2), k.size(2)
        key_positions = torch.arange(n_keys, device=q.device)
        query_positions = key_positions[n_keys - n_queries:]
        distance = (query_positions[:, None] - key_positions[None, :]).abs()  # (Tq, Tk)
        slopes = torch.tensor(head_slopes(n_heads), device=q.device)  # (h,)
        return -slopes[:, None, None] * distance  # (h, Tq, Tk)


def head_slopes(n_heads: int) -> list[float]:
    """The paper's slopes: for a power of two n, 2^(-8/n) to the powers 1..n; otherwise
    those of the power of two below n, then every other slope of twice that power (the
    authors' code, github.com/ofirpress/attention_with_linear_biases)."""
    def geometric(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return geometric(n_heads)
    below = 2 ** math.floor(math.log2(n_heads))
    return geometric(below) + head_slopes(2 * below)[0::2][: n_heads - below]
