"""RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization", equation 4):
``(..., d) -> (..., d)``.

    RMSNorm(x) = x / sqrt(mean(x^2) + eps) * g

LayerNorm without re-centring (no mean subtracted, no bias): cheaper, and as good in
their experiments. Computed in float32 at least, then cast back: under bf16 autocast the
input is bf16 (a bf16 mean of squares would lose precision, and torch's fused kernel needs
input and weight of one dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, d_model: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))  # g, the gain

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        return F.rms_norm(x.to(dtype), (x.size(-1),), self.weight.to(dtype), self.eps
                          ).to(x.dtype)
