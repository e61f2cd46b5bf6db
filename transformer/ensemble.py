"""Several trained models decoded as one (fairseq's ``--path a.pt:b.pt``).

At each step every member scores the next token and the ensemble takes the mean of their
probabilities: ``log p(y) = log (1/n sum_i p_i(y))``. Models trained from different seeds
make different errors, so the mean is usually better than any member (the paper's big
models and most WMT systems are ensembles or checkpoint averages, section 6.1).

``Ensemble`` has what the searches of ``transformer.decoding`` use of a ``Transformer``
(``encode``, ``decode``, ``new_cache``, ``max_len``), so ``beam_search``,
``greedy_search`` and ``translate`` take either. The members must share the target
vocabulary (the same tokenizer); their sizes may differ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.model import DecoderCache, Transformer


class EnsembleCache:
    """One ``DecoderCache`` a member, reordered together."""

    def __init__(self, members: list[DecoderCache]):
        self.members = members

    def reorder(self, index: Tensor, cross_attention: bool = True) -> None:
        for cache in self.members:
            cache.reorder(index, cross_attention)


class Ensemble(nn.Module):
    def __init__(self, models: Sequence[Transformer]):
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one model")
        vocab_sizes = {model.output_projection.out_features for model in models}
        if len(vocab_sizes) > 1:
            raise ValueError(f"the models' target vocabularies differ in size: {vocab_sizes}")
        self.models = nn.ModuleList(models)
        self.widths = [model.d_model for model in models]

    @property
    def max_len(self) -> int:
        """Target positions every member can embed."""
        return min(model.max_len for model in self.models)

    def encode(self, src_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """-> the members' encoder outputs side by side, (B, S, sum of their d_model), and
        the source padding mask (B, S), True at padding (the same for every member)."""
        encoded = [model.encode(src_tokens) for model in self.models]
        memory = torch.cat([member_memory for member_memory, _ in encoded], dim=-1)
        return memory, encoded[0][1]

    def decode(self, tgt_tokens: Tensor, memory: Tensor, src_padding_mask: Tensor,
               cache: EnsembleCache | None = None) -> Tensor:
        """The log of the mean of the members' next-token probabilities (B, T, V), at least
        float32: logits whose softmax is that mean."""
        caches = cache.members if cache is not None else [None] * len(self.models)
        lprobs = []
        for model, member_memory, member_cache in zip(
                self.models, memory.split(self.widths, dim=-1), caches, strict=True):
            logits = model.decode(tgt_tokens, member_memory, src_padding_mask, member_cache)
            lprobs.append(F.log_softmax(
                logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1))
        return torch.logsumexp(torch.stack(lprobs), dim=0) - math.log(len(lprobs))

    def new_cache(self) -> EnsembleCache:
        return EnsembleCache([model.new_cache() for model in self.models])
