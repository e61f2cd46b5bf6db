"""The SwiGLU feed-forward network (Shazeer 2020, "GLU Variants Improve Transformer",
equation 6): ``(B, T, d) -> (B, T, d)``.

    FFN_SwiGLU(x) = (Swish(x W) * x V) W2        (no biases, as in the paper)

A gate (Swish of one projection) multiplies a second projection elementwise. With three
matrices instead of two it has 1.5x the parameters of the paper's ReLU network at the
same ``d_ff``; Shazeer keeps the cost equal with d_ff at 2/3 of the ReLU network's
(e.g. ``model.d_ff=1365`` beside 2048).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from transformer.attention import check_dropout
from transformer.dropout import Dropout


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        check_dropout("dropout", dropout)
        self.gate = nn.Linear(d_model, d_ff, bias=False)  # W
        self.up = nn.Linear(d_model, d_ff, bias=False)  # V
        self.down = nn.Linear(d_ff, d_model, bias=False)  # W2
        self.dropout = Dropout(dropout)  # on the hidden activations, as FeedForward's

    def forward(self, x: Tensor) -> Tensor:
        # Swish with beta = 1 is SiLU: x * sigmoid(x).
        return self.down(self.dropout(F.silu(self.gate(x)) * self.up(x)))
