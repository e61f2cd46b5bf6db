"""Label-smoothed cross-entropy, paper section 5.4.

The target distribution puts ``1 - epsilon`` on the reference token and spreads
``epsilon`` uniformly over the vocabulary (PyTorch's ``label_smoothing`` convention);
padding positions are ignored. Sums are returned so that the trainer can normalise by
the number of target tokens of the whole (possibly accumulated) batch.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def label_smoothed_cross_entropy(
    logits: Tensor, target: Tensor, epsilon: float = 0.1, ignore_index: int = 0
) -> tuple[Tensor, Tensor]:
    """logits (N, V) and target (N,) -> (smoothed loss sum, nll sum), both scalars, fp32.

    The log-softmax runs in float32 whatever the logits' dtype: bf16 log-probabilities
    lose the small differences that label smoothing and perplexity depend on.
    """
    lprobs = F.log_softmax(logits.float(), dim=-1)  # (N, V)
    keep = target.ne(ignore_index)  # (N,)
    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (N,)
    smooth = -lprobs.mean(dim=-1)  # (N,) cross-entropy against the uniform distribution
    loss = (1.0 - epsilon) * nll + epsilon * smooth
    return loss.masked_fill(~keep, 0.0).sum(), nll.masked_fill(~keep, 0.0).sum()
