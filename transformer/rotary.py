"""Rotary position embeddings (RoPE; Su et al. 2021, "RoFormer", section 3.4).

Positions enter attention rather than the embeddings: each query and key is rotated, pair
of dimensions by pair, by an angle proportional to its position (equation 34), so the
score of a query at position m for a key at n depends on m - n only (equation 16).

``model/positional=rope``: nothing is added to the token embeddings (they still get the
paper's dropout, section 5.4); the model hands this module to every self-attention
(``in_attention``), which calls ``rotate`` on its projected queries and keys, the
decoder's at their true positions while decoding with a key/value cache.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from transformer.attention import check_dropout
from transformer.dropout import Dropout


class RotaryPositions(nn.Module):
    in_attention = True  # the model gives it to every self-attention as ``positions``

    def __init__(self, d_model: int, max_len: int, dropout: float = 0.0, base: float = 10000.0):
        super().__init__()
        check_dropout("dropout", dropout)
        self.max_len, self.base = max_len, base  # max_len: the decoding limits read it
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """The token embeddings (B, T, d), with dropout only: positions act in attention."""
        return self.dropout(x)

    def rotate(self, q: Tensor, k: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        """q, k (B, h, T, d_k) at positions offset .. offset+T-1 -> both rotated: the pair
        (x_2i, x_2i+1) by the angle position * base^(-2i/d_k). An odd d_k leaves its last
        dimension as it is."""
        angles = self.angles(offset, q.size(2), q.size(3), q.device)  # (T, d_k // 2)
        cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)
        return rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)

    def angles(self, offset: int, length: int, d_k: int, device: torch.device) -> Tensor:
        # In float32 from exact integer positions: position m gets the same angle whatever
        # the offset, so a cached decoding step rotates exactly as the full forward does.
        positions = torch.arange(offset, offset + length, device=device, dtype=torch.float32)
        theta = self.base ** (-torch.arange(0, d_k - 1, 2, device=device,
                                            dtype=torch.float32) / d_k)  # (d_k // 2,)
        return positions[:, None] * theta[None, :]

    def bias(self, q: Tensor, k: Tensor) -> None:
        """No bias on the scores: the rotation carries the positions."""
        return None


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (..., T, d_k), cos/sin (T, n) with n = d_k // 2: each pair (x_2i, x_2i+1) turned
    by its angle, as the complex number x_2i + i x_2i+1 times e^(i angle)."""
    n = cos.size(-1)
    pairs = x[..., : 2 * n].unflatten(-1, (n, 2))  # (..., T, n, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    rotated = rotated.flatten(-2)  # (..., T, 2n)
    return rotated if 2 * n == x.size(-1) else torch.cat([rotated, x[..., 2 * n:]], dim=-1)
