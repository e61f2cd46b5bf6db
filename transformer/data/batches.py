"""``collate``: the pairs of one batch as padded tensors (a ``Batch``), with the
``<s>``/``</s>`` that the model's input and target need."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from transformer.data.sampler import TokenBatchSampler
from transformer.data.storage import EncodedSplit
from transformer.tokenizer import BOS_ID, EOS_ID, PAD_ID

if TYPE_CHECKING:
    import torch


@dataclass
class Batch:
    """A padded batch of B pairs; every tensor is right-padded with ``<pad>`` (id 0)."""

    src_tokens: torch.Tensor  # (B, S) source ids + </s>
    tgt_input: torch.Tensor  # (B, T) <s> + target ids: the decoder's input (teacher forcing)
    tgt_output: torch.Tensor  # (B, T) target ids + </s>: what the decoder must predict
    indices: list[int]  # the pairs' indices in their split, e.g. for reference texts
    n_src_tokens: int  # non-pad tokens in src_tokens
    n_tgt_tokens: int  # non-pad tokens in tgt_output: the tokens the loss is taken over

    def __len__(self) -> int:
        return len(self.indices)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """On the device; ``non_blocking`` to a GPU copies from pinned memory, so that the
        host can prepare the next batch while the GPU works."""
        pin = non_blocking and str(device).startswith("cuda")  # torch is not imported here
        move = {name: (getattr(self, name).pin_memory()
                       if pin and not getattr(self, name).is_pinned() else getattr(self, name))
                .to(device, non_blocking=non_blocking)
                for name in ("src_tokens", "tgt_input", "tgt_output")}
        return Batch(**move, indices=self.indices, n_src_tokens=self.n_src_tokens,
                     n_tgt_tokens=self.n_tgt_tokens)


def collate(split: EncodedSplit, indices: Sequence[int], pad_id: int = PAD_ID,
            pin: bool = False) -> Batch:
    """Pairs ``indices`` of ``split`` as one Batch, padded to its longest sentence; ``pin``:
    in page-locked memory, ready for an asynchronous copy to a GPU."""
    src_rows = [split.src_ids.row(i) for i in indices]
    tgt_rows = [split.tgt_ids.row(i) for i in indices]
    tensors = [_pad(src_rows, pad_id, bos=False), _pad(tgt_rows, pad_id, bos=True),
               _pad(tgt_rows, pad_id, bos=False)]
    if pin:
        tensors = [tensor.pin_memory() for tensor in tensors]
    return Batch(*tensors,
                 indices=list(indices),
                 n_src_tokens=sum(len(row) + 1 for row in src_rows),
                 n_tgt_tokens=sum(len(row) + 1 for row in tgt_rows))


def _pad(rows: list[np.ndarray], pad_id: int, bos: bool) -> torch.Tensor:
    """(B, longest + 1): each row with <s> before it (bos) or </s> after it, then padding."""
    import torch  # here: preparing data needs no torch, which takes ~1.5 s to import

    out = np.full((len(rows), max(map(len, rows)) + 1), pad_id, dtype=np.int64)
    for i, row in enumerate(rows):
        if bos:
            out[i, 0], out[i, 1:len(row) + 1] = BOS_ID, row
        else:
            out[i, :len(row)], out[i, len(row)] = row, EOS_ID
    return torch.from_numpy(out)


def iterate_batches(split: EncodedSplit, sampler: TokenBatchSampler, epoch: int,
                    start: int = 0) -> Iterator[Batch]:
    """The batches of ``epoch`` from the ``start``-th on, collated on the CPU."""
    for indices in sampler.batches(epoch, start):
        yield collate(split, indices)
