"""Positional encodings, paper section 3.5: ``(B, T, d) -> (B, T, d)``.

Attention has no notion of order, so each position's vector gets a position-dependent
vector added to it: the paper's fixed sinusoids, or a learned table (``kind="learned"``).
``kind="sinusoidal_concat"`` holds the same sinusoids with every sine first and every
cosine after them (tensor2tensor's and Marian's layout, needed to import OPUS-MT models).
Positions that act inside attention instead of being added here: ``rotary.py`` (RoPE) and
``alibi.py`` (ALiBi).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from transformer.attention import check_dropout
from transformer.dropout import Dropout

KINDS = ("sinusoidal", "sinusoidal_concat", "learned")


def sinusoids(max_len: int, d_model: int, concat: bool = False) -> Tensor:
    """(max_len, d_model): PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...);
    ``concat``: [all the sines | all the cosines] instead of interleaved."""
    position = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)  # (L, 1)
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64)
                         * (-math.log(10000.0) / d_model))  # (ceil(d/2),)
    angles = position * inv_freq  # (L, ceil(d/2))
    sines, cosines = torch.sin(angles), torch.cos(angles[:, : d_model // 2])
    if concat:
        return torch.cat([sines, cosines], dim=1).float()
    table = torch.zeros(max_len, d_model, dtype=torch.float64)
    table[:, 0::2] = sines
    table[:, 1::2] = cosines
    return table.float()


class PositionalEncoding(nn.Module):
    def __init__(self, d_model: int, max_len: int, dropout: float = 0.0, kind: str = "sinusoidal"):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not one of {list(KINDS)}")
        check_dropout("dropout", dropout)
        self.kind, self.max_len = kind, max_len
        if kind.startswith("sinusoidal"):
            # A buffer, not a parameter: fixed, moves with .to(device), not in checkpoints.
            table = sinusoids(max_len, d_model, concat=kind == "sinusoidal_concat")
            self.register_buffer("table", table, persistent=False)
        else:
            self.table = nn.Parameter(torch.empty(max_len, d_model).normal_(0, d_model**-0.5))
        self.dropout = Dropout(dropout)  # on the sums, section 5.4

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """Add the encodings of positions offset .. offset+T-1 (offset > 0 when decoding
        incrementally with a cache)."""
        T = x.size(1)
        if offset + T > self.max_len:
            raise ValueError(
                f"sequence of {offset + T} positions is longer than max_len={self.max_len}"
            )
        return self.dropout(x + self.table[offset : offset + T].to(x.dtype))
