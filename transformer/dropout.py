"""Dropout (paper section 5.4) with a cheaper mask on the CPU, and token dropout."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Dropout(nn.Dropout):
    """``nn.Dropout`` (section 5.4), except that on the CPU each element's coin is 16
    random bits instead of a float from the Bernoulli sampler behind ``F.dropout``: one
    64-bit draw serves four elements, which makes the mask about 3x cheaper there
    (docs/benchmarks.md). An element is dropped with probability ``round(p * 65536) /
    65536`` (within 1e-5 of p) and the kept ones are scaled by ``1 / (1 - that)``, which
    keeps the expectation exact (in bf16 up to the scale's rounding, as with ``F.dropout``)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        return x * dropout_mask(x, self.p)


def dropout_mask(x: Tensor, p: float) -> Tensor:
    """0 or 1/(1-p') in x's shape and dtype, with p' = round(p * 2^16) / 2^16 the chance of
    a 0, from 16 uniform random bits per element (the default CPU generator)."""
    n_dropped = min(round(p * 65536), 65535)  # of the 65536 values of an int16
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device)
    bits = words.random_(-2**63, None).view(torch.int16)[: x.numel()].view(x.shape)
    return bits.ge(n_dropped - 32768).to(x.dtype).mul_(65536 / (65536 - n_dropped))


class TokenDropout(nn.Module):
    """Word dropout (Sennrich and Zhang 2019, "Revisiting Low-Resource Neural Machine
    Translation"): in training, each token's whole embedding vector (B, T, d) is zeroed
    with probability p and the kept ones are scaled by 1/(1-p), so the model must guess
    the word from its context. Not in the paper; off (p=0) by default."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.dropout = Dropout(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.dropout.p == 0.0:
            return x
        return x * self.dropout(x.new_ones(x.shape[:-1] + (1,)))  # one coin a token
