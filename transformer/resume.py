"""Resume guards: what decides a run's data order, recorded in every checkpoint and
compared when the run is resumed.

A checkpoint's place in the data is an index, (``epoch``, ``batch_in_epoch``), into a batch
order that the training split as encoded, the batching options, the seed, the number of
ranks and gradient accumulation decide together. Resumed under other values, the same index
names other batches, and the run would skip or repeat data without a word (among the most
reported resume problems of fairseq, OpenNMT-py and Hugging Face). So a resume that changes
one of them stops, naming each change, unless ``trainer.reset_dataloader=true`` accepts them
(as fairseq's ``--reset-dataloader``): the run then keeps its weights, optimizer, schedule
and step, and restarts the current epoch at its first batch under the new settings.

The tokenizer is not compared but carried over: a resumed run encodes with the checkpoint's
own tokenizer (``prepare_data``'s ``given_tokenizers``), whatever the cache or ``data.*``
would build today.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np

from transformer.checkpoint import CheckpointError
from transformer.data import EncodedSplit, TranslationData, tokenizer_hash

log = logging.getLogger("transformer")

# How each item is named in messages; the others are named by their config key.
LABELS = {"train_data": "training data",
          "world_size": "world size (torchrun --nnodes x --nproc_per_node)"}
# Settings of the tokenizer a resumed run does not build (it keeps the checkpoint's).
TOKENIZER_KEYS = ("vocab_size", "joint_vocab", "lowercase")


def data_fingerprint(data_cfg: Any, trainer_cfg: Any, data: TranslationData,
                     world_size: int) -> dict[str, Any]:
    """What decides the order of the training batches (``TokenBatchSampler``, the loop's
    grouping into steps) and what is in them: plain values, stored in checkpoints."""
    split = data.splits[data_cfg.train_split]
    return {
        "train_data": f"{len(split)} pairs, sha256 {split_hash(split)}",
        "tokenizer": tokenizer_hash((data.src_tokenizer, data.tgt_tokenizer)),
        "data.max_tokens": data_cfg.max_tokens,
        "data.max_sentences": data_cfg.max_sentences,
        "data.max_len": data_cfg.max_len,
        "trainer.seed": trainer_cfg.seed,
        "trainer.grad_accum": trainer_cfg.grad_accum,
        "trainer.overfit_batches": trainer_cfg.overfit_batches,
        "world_size": world_size,
    }


def split_hash(split: EncodedSplit) -> str:
    """A hash of a split's ids as encoded: the same corpus gives the same hash wherever its
    files lie and whatever their dates; an edited line, another ``data.max_len`` (which
    drops other pairs) or another tokenizer gives another."""
    digest = hashlib.sha256()
    for ids in (split.src_ids, split.tgt_ids):
        digest.update(np.ascontiguousarray(ids.offsets, dtype=np.int64))
        digest.update(np.ascontiguousarray(ids.values, dtype=np.int32))  # memory-mapped: no copy
    return digest.hexdigest()[:16]


def data_order_changes(checkpoint: dict[str, Any], current: dict[str, Any], reset: bool
                       ) -> list[str]:
    """The items of ``current`` that differ from the fingerprint ``checkpoint`` was saved
    with, as ``key: old -> new``. A CheckpointError naming them all, in one line, unless
    ``reset`` (``trainer.reset_dataloader``) accepts them. A checkpoint of older code has no
    fingerprint: only its world size can be checked, and a warning says so."""
    saved = checkpoint.get("data_fingerprint")
    if saved is None:
        log.warning("the checkpoint holds no data fingerprint (written by older code): "
                    "whether its place in the data still fits this run cannot be checked")
        saved = {"world_size": checkpoint.get("world_size", 1)}
    changes = [f"{LABELS.get(key, key)}: {saved[key]} -> {value}"
               for key, value in current.items() if key in saved and saved[key] != value]
    if changes and not reset:
        train_state = checkpoint.get("train_state", {})
        raise CheckpointError(
            f"the checkpoint of step {checkpoint['step']} was trained on another data order: "
            f"{'; '.join(changes)}. Resuming its place in the epoch would skip or repeat "
            f"data. Undo the change, or set trainer.reset_dataloader=true to keep the "
            f"weights, optimizer and step and restart epoch {train_state.get('epoch', 0)} "
            "at its first batch under the new settings")
    return changes


def adopt_tokenizer_settings(data_cfg: Any, saved: dict[str, Any]) -> None:
    """A resumed run keeps the checkpoint's tokenizer, so its ``data.vocab_size``,
    ``joint_vocab`` and ``lowercase`` (``saved``: the checkpoint's ``data`` config) replace
    this run's: they key the data cache, and ``lowercase`` also decides how val BLEU is
    taken. A warning names each setting that does not apply."""
    for key in TOKENIZER_KEYS:
        if key in saved and data_cfg[key] != saved[key]:
            log.warning("data.%s=%s does not apply to a resumed run: it keeps the "
                        "checkpoint's tokenizer (data.%s=%s)", key, data_cfg[key], key,
                        saved[key])
            data_cfg[key] = saved[key]


def reseeded(seed: int, step: int, rank: int) -> int:
    """A seed for ``rank``'s random streams when a run resumes at ``step`` under another
    world size (its ranks' saved streams no longer map onto the new ones): distinct for
    each rank, and not the streams the run started with."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
