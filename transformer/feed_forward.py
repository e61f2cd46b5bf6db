"""Position-wise feed-forward network, paper section 3.3: ``(B, T, d) -> (B, T, d)``.

The same two-layer network is applied to every position (the seed's "pass each of n
vectors, in parallel, into the exact same NN"); each layer of the model has its own.
The gated variant SwiGLU is in ``swiglu.py``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from transformer.attention import check_dropout
from transformer.dropout import Dropout

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, activation: str = "relu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation={activation!r} is not one of {sorted(ACTIVATIONS)}"
            )
        check_dropout("dropout", dropout)
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.activation = ACTIVATIONS[activation]
        self.dropout = Dropout(dropout)  # on the hidden activations, as in fairseq

    def forward(self, x: Tensor) -> Tensor:
        # FFN(x) = act(x W1 + b1) W2 + b2, equation (2)
        return self.linear2(self.dropout(self.activation(self.linear1(x))))
