"""``TokenBatchSampler``: pairs of similar length grouped into batches of at most
``max_tokens`` padded tokens per side, shuffled per epoch, shared out among ranks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from transformer.data.storage import EncodedSplit
from transformer.data.text import DataError


class TokenBatchSampler:
    """Batches of pair indices with at most ``max_tokens`` padded tokens per side, like
    fairseq's ``--max-tokens``: pairs of similar length share a batch, so little is padding.

    ``src_lengths``/``tgt_lengths`` are the lengths of the sequences as batched, i.e. with
    their ``</s>`` (or ``<s>``): a batch of B pairs whose longest has L tokens on either side
    is a (B, L) tensor, and B * L <= max_tokens. Which pairs share a batch is fixed by
    ``seed`` (ties in length are broken at random); the order of the batches changes with
    (seed, epoch). Each of ``world_size`` ranks takes every world_size-th batch; the list is
    first extended by repeating its first batches so that all ranks get the same number.
    """

    def __init__(self, src_lengths: Sequence[int] | np.ndarray,
                 tgt_lengths: Sequence[int] | np.ndarray, max_tokens: int,
                 max_sentences: int | None = None, shuffle: bool = True, seed: int = 1,
                 rank: int = 0, world_size: int = 1) -> None:
        src_lengths, tgt_lengths = np.asarray(src_lengths), np.asarray(tgt_lengths)
        if src_lengths.shape != tgt_lengths.shape:
            raise ValueError(f"{len(src_lengths)} source lengths but {len(tgt_lengths)} target")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        widths = np.maximum(src_lengths, tgt_lengths)  # (N,) the tensor width each pair needs
        _check_fits(widths, src_lengths, tgt_lengths, max_tokens)
        if shuffle:  # stable sort of a random permutation: random order among equal lengths
            order = np.random.default_rng(seed).permutation(len(widths))
        else:
            order = np.arange(len(widths))
        # Sort by the width that bounds a batch, then by target and source length: fuller
        # batches than fairseq's (target, source) order (119 instead of 128 on Multi30k).
        order = order[_stable_sort_by(widths[order], tgt_lengths[order], src_lengths[order])]
        self._batches = _fill_batches(order, widths, max_tokens, max_sentences)

    @classmethod
    def for_split(cls, split: EncodedSplit, max_tokens: int, **kwargs: Any) -> TokenBatchSampler:
        """A sampler over ``split``; the lengths count the ``</s>``/``<s>`` that collate adds."""
        return cls(split.src_ids.lengths + 1, split.tgt_ids.lengths + 1, max_tokens, **kwargs)

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return -(-len(self._batches) // self.world_size)

    def batches(self, epoch: int, start: int = 0) -> list[list[int]]:
        """This rank's batches of ``epoch`` from the ``start``-th on (to resume a run)."""
        if not self._batches:
            return []
        order = np.arange(len(self._batches))
        if self.shuffle:
            np.random.default_rng([self.seed, epoch]).shuffle(order)
        order = np.resize(order, len(self) * self.world_size)  # repeats from the start
        mine = order[self.rank::self.world_size]
        return [self._batches[i].tolist() for i in mine[start:]]


def _check_fits(widths: np.ndarray, src_lengths: np.ndarray, tgt_lengths: np.ndarray,
                max_tokens: int) -> None:
    too_wide = np.flatnonzero(widths > max_tokens)
    if len(too_wide):
        i = too_wide[0]
        raise DataError(f"{len(too_wide)} pair(s) do not fit in max_tokens={max_tokens} on "
                        f"their own, e.g. pair {i} with {src_lengths[i]} source and "
                        f"{tgt_lengths[i]} target tokens; raise data.max_tokens or lower "
                        f"data.max_len")


def _stable_sort_by(*keys: np.ndarray) -> np.ndarray:
    """``np.lexsort`` of ``keys``, the first most significant: ties keep their order. One
    stable sort of a packed int64 key where lengths fit in 21 bits (2.5 times faster)."""
    packable = all(len(key) == 0 or key.min() >= 0 and key.max() < 1 << 21 for key in keys)
    if packable and len(keys) <= 3:
        packed = np.zeros(len(keys[0]), np.int64)
        for key in keys:
            packed = (packed << 21) | key.astype(np.int64)
        return np.argsort(packed, kind="stable")
    return np.lexsort(keys[::-1])


def _fill_batches(order: np.ndarray, widths: np.ndarray, max_tokens: int,
                  max_sentences: int | None) -> list[np.ndarray]:
    """Cut the length-sorted ``order`` greedily into batches: a pair joins the open batch
    while (pairs x widest pair) stays within max_tokens and pairs within max_sentences.
    Numpy finds each batch's end in the window of pairs it could hold (a batch starting
    with a pair of width w holds at most max_tokens // w): one step per batch, not per
    pair (5M pairs: 0.3 s instead of 6)."""
    max_sentences = max_sentences or len(order) or 1
    sorted_widths = widths[order]
    batches, first = [], 0
    while first < len(order):
        room = min(max_tokens // max(int(sorted_widths[first]), 1), max_sentences)
        window = sorted_widths[first:first + room]  # (room,) at most; the batch is within it
        sizes = np.arange(1, len(window) + 1)
        fits = sizes * np.maximum.accumulate(window) <= max_tokens
        size = max(int(np.argmin(fits)) if not fits.all() else len(window), 1)
        batches.append(order[first:first + size])
        first += size
    return batches
