"""Drawing the next token at random: temperature, top-k and top-p (nucleus) sampling,
reproducible from a seed.

``Sampler(temperature, top_k, top_p, seed).draw(lprobs (R, V), uniforms (R,))`` turns the
searches' next-token log-probabilities into a distribution and draws one token a row:

* ``temperature`` T divides the log-probabilities: T < 1 sharpens the distribution (T -> 0
  is greedy), T > 1 flattens it;
* ``top_k`` > 0 keeps the k most probable tokens (Fan et al. 2018);
* ``top_p`` < 1 keeps the smallest set of most probable tokens whose probability (after
  the temperature) reaches p, the nucleus (Holtzman et al. 2020); the most probable
  token is always kept.

The draw is an inverse-CDF lookup of one uniform number a row. Each sentence gets its own
stream of uniforms, from a ``torch.Generator`` seeded by ``(seed, the sentence's id)``:
a sentence's sample depends on the seed and its id only, not on the other sentences of
its batch or how the batches were cut; nor on the device (the uniforms are drawn on the
CPU), but for a uniform that falls, within float rounding, on a boundary of the CDF.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from transformer.config import ConfigError

NEG_INF = float("-inf")


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """ConfigError naming the key for a value that cannot work."""
    if not 0 < temperature < math.inf:
        raise ConfigError(f"temperature={temperature} must be > 0 (greedy search takes the "
                          "most probable token)")
    if top_k < 0:
        raise ConfigError(f"top_k={top_k} must be >= 0 (0: no top-k filter)")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p} must be in (0, 1] (1: no nucleus filter)")


class Sampler:
    """Temperature, top-k and top-p sampling of one token a row (see the module doc)."""

    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 1):
        check_sampling(temperature, top_k, top_p)
        self.temperature, self.top_k, self.top_p, self.seed = temperature, top_k, top_p, seed

    def probabilities(self, lprobs: Tensor) -> Tensor:
        """The distribution (R, V) to draw from: ``lprobs`` (R, V) (-inf: not allowed)
        with the temperature, then the top-k and top-p filters."""
        logits = lprobs / self.temperature
        if 0 < self.top_k < logits.size(-1):
            kth_best = logits.topk(self.top_k, dim=-1).values[:, -1:]  # (R, 1)
            logits = logits.masked_fill(logits < kth_best, NEG_INF)
        if self.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)  # (R, V)
            probs = F.softmax(sorted_logits, dim=-1)
            # A token is outside the nucleus when the more probable ones reach top_p.
            outside = (probs.cumsum(dim=-1) - probs) >= self.top_p
            outside[:, 0] = False
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, NEG_INF))
        return F.softmax(logits, dim=-1)

    def draw(self, lprobs: Tensor, uniforms: Tensor) -> Tensor:
        """One token (R,) a row of ``lprobs`` (R, V), each row by its uniform number in
        [0, 1) of ``uniforms`` (R,): the first token whose cumulative probability
        exceeds it (a token of probability 0 never)."""
        probs = self.probabilities(lprobs).double()  # the cumulative sums in float64
        cdf = probs.cumsum(dim=-1)  # (R, V)
        targets = uniforms.to(cdf) * cdf[:, -1]  # (R,)
        tokens = torch.searchsorted(cdf, targets[:, None], right=True)[:, 0]
        return tokens.clamp_(max=lprobs.size(-1) - 1)

    def uniforms(self, sentence_ids: list[int], n_steps: int) -> Tensor:
        """(len(sentence_ids), n_steps) float64 uniform numbers in [0, 1) on the CPU: row
        i is the stream of the sentence with id ``sentence_ids[i]``."""
        rows = [torch.rand(n_steps, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(stream_seed(self.seed, i)))
                for i in sentence_ids]
        return torch.stack(rows) if rows else torch.zeros(0, n_steps, dtype=torch.float64)


def stream_seed(seed: int, sentence_id: int) -> int:
    """A 63-bit seed for ``(seed, sentence_id)``: hashed, so that neighbouring seeds and
    ids give unrelated streams (seed + id would give seed 1's sentence 0 to seed 0's 1)."""
    digest = hashlib.blake2b(f"{seed}:{sentence_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
