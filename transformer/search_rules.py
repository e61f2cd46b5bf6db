"""What may come next in a search, besides what the model says: the rules every search
(greedy, beam, sampling) applies to the next-token log-probabilities (R, V) of its R live
prefixes before it chooses, by setting the tokens it may not take to -inf.

* pad and BOS never; EOS not before ``min_len`` tokens; only EOS at the maximum length;
* ``no_repeat_ngram_size=n`` (fairseq's ``--no-repeat-ngram-size``): no token that would
  complete an n-gram already in the hypothesis;
* a forced target prefix (fairseq's ``prefix_tokens``): while a hypothesis is shorter than
  its sentence's prefix, only the prefix's next token, e.g. a language tag.

A token that is let through keeps the model's log-probability, so a hypothesis's score is
always the model's own (what teacher forcing gives), whatever the rules removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from transformer.tokenizer import BOS_ID, EOS_ID, PAD_ID

NEG_INF = float("-inf")


@dataclass
class SpecialIds:
    """The ids the search treats specially (the defaults: ``transformer.tokenizer``'s)."""

    bos: int = BOS_ID
    eos: int = EOS_ID
    pad: int = PAD_ID


def constrain(lprobs: Tensor, step: int, min_len: int, force_eos: Tensor,
              ids: SpecialIds) -> Tensor:
    """Set to -inf, in place, the tokens that may not come next in ``lprobs`` (R, V):
    pad and BOS always, EOS before ``min_len``; rows where ``force_eos`` (R,) (CPU bool,
    the maximum length is reached) may take only EOS, with the model's probability."""
    eos_lprobs = lprobs[:, ids.eos].clone()  # (R,)
    lprobs[:, ids.pad] = NEG_INF
    lprobs[:, ids.bos] = NEG_INF
    if step < min_len:
        lprobs[:, ids.eos] = NEG_INF
    if force_eos.any():
        forced = force_eos.to(lprobs.device)
        lprobs.masked_fill_(forced[:, None], NEG_INF)
        lprobs[:, ids.eos] = torch.where(forced, eos_lprobs, lprobs[:, ids.eos])
    return lprobs


def ban_repeated_ngrams(lprobs: Tensor, tokens: Tensor, n: int) -> Tensor:
    """Set to -inf, in place, in ``lprobs`` (R, V) each token that would complete an
    n-gram already in its row of ``tokens`` (R, t) (the hypothesis so far, BOS first):
    the last ``n - 1`` tokens are compared with every earlier window of ``n - 1``."""
    t = tokens.size(1)
    if n < 1 or t < n:  # no whole n-gram yet
        return lprobs
    # Every n-gram (R, t - n + 1, n) of the hypothesis; its last token is banned where its
    # first n - 1 equal the hypothesis's last n - 1 tokens.
    ngrams = tokens.unfold(1, n, 1)  # (R, W, n)
    matches = (ngrams[:, :, :-1] == tokens[:, None, t - n + 1:]).all(dim=-1)  # (R, W)
    # Counted per token with a scatter, not listed with nonzero(): no wait for the GPU.
    counts = torch.zeros(lprobs.shape, dtype=torch.int32, device=lprobs.device)
    counts.scatter_add_(1, ngrams[:, :, -1], matches.int())  # (R, V)
    return lprobs.masked_fill_(counts > 0, NEG_INF)


def forced(lprobs: Tensor, tokens: Tensor) -> Tensor:
    """A copy of ``lprobs`` (R, V) where each row may take only its token of ``tokens``
    (R,), with the model's log-probability."""
    index = tokens[:, None]  # (R, 1)
    return torch.full_like(lprobs, NEG_INF).scatter_(1, index, lprobs.gather(1, index))


@dataclass
class Rules:
    """The rules of one search over a batch of B sentences. ``prefix_tokens`` (B, P)
    right-padded and ``prefix_lengths`` (B,) (long, on the model's device) or None."""

    ids: SpecialIds
    min_len: int = 1
    no_repeat_ngram_size: int = 0
    prefix_tokens: Tensor | None = None
    prefix_lengths: Tensor | None = None

    def apply(self, lprobs: Tensor, step: int, tokens: Tensor, sentences: Tensor,
              force_eos: Tensor) -> Tensor:
        """``lprobs`` (R, V) of the prefixes ``tokens`` (R, step + 1), row r extending a
        hypothesis of sentence ``sentences[r]`` (R,) (its batch index), with the tokens
        that may not come next at -inf (in place where it can); ``force_eos`` (R,) CPU
        bool: the rows at their maximum length."""
        if self.forcing(step):  # before the rules below: no rule removes the user's prefix
            sentences = sentences.to(lprobs.device)
            in_prefix = self.prefix_lengths[sentences] > step  # (R,)
            prefix_step = forced(lprobs, self.prefix_tokens[sentences, step])
        constrain(lprobs, step, self.min_len, force_eos, self.ids)
        if self.no_repeat_ngram_size > 0:
            ban_repeated_ngrams(lprobs, tokens, self.no_repeat_ngram_size)
        if self.forcing(step):
            lprobs = torch.where(in_prefix[:, None], prefix_step, lprobs)
        return lprobs

    def forcing(self, step: int) -> bool:
        return self.prefix_tokens is not None and step < self.prefix_tokens.size(1)


def pad_prefixes(prefixes: list[list[int]], pad_id: int, device: torch.device
                 ) -> tuple[Tensor, Tensor]:
    """Target prefixes (token lists, some maybe empty) -> ``(tokens (B, P), lengths (B,))``
    for ``Rules``."""
    lengths = torch.tensor([len(p) for p in prefixes], dtype=torch.long)
    tokens = torch.full((len(prefixes), max(1, *map(len, prefixes))), pad_id, dtype=torch.long)
    for row, prefix in enumerate(prefixes):
        tokens[row, : len(prefix)] = torch.tensor(prefix, dtype=torch.long)
    return tokens.to(device), lengths.to(device)
