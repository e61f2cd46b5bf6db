"""``prepare_data``: train or load the BPE tokenizer, encode every split, and cache both
under ``cfg.cache_dir/<key>/``, safely when several processes (ranks) do it at once."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import compress
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from transformer.config import DataConfig
from transformer.data.corpora import FileCorpus, HubCorpus, open_corpus
from transformer.data.mixing import MixedCorpus, mix
from transformer.data.multilingual import MultilingualCorpus, directions_name
from transformer.data.storage import (
    FIELDS,
    EncodedSplit,
    Ragged,
    SplitStats,
    TranslationData,
    _RaggedWriter,
    dropped_text,
)
from transformer.data.text import DataError
from transformer.data.words import FlatEncoder, count_pieces, flat_encoder
from transformer.tokenizer import Tokenizer

Corpus = FileCorpus | HubCorpus | MixedCorpus | MultilingualCorpus
CACHE_VERSION = 1  # bump when the cached format or the encoding changes
# data.tokenizer_sample's default. It is in the tokenizer's cache key only when set to
# another value, so caches made before the key existed (corpora below it) stay valid.
DEFAULT_TOKENIZER_SAMPLE = 1_000_000



def prepare_data(cfg: DataConfig, splits: Sequence[str] | None = None,
                 log: Callable[[str], Any] = print,
                 given_tokenizers: tuple[Any, Any] | None = None) -> TranslationData:
    """Read, tokenize, filter and encode ``splits`` (by default train, valid and test), from
    the cache when the files and options are the same as in an earlier run.
    ``given_tokenizers``: ``(src, tgt)`` to use instead of training BPE on the train split
    (fine-tuning a checkpoint keeps its tokenizer; ``data.vocab_size``, ``joint_vocab`` and
    ``lowercase`` then do not apply)."""
    names = list(dict.fromkeys(splits or [cfg.train_split, cfg.valid_split, *cfg.test_splits]))
    _check_cache_dir(cfg.cache_dir)
    # The train split keys (and trains) the tokenizer, whichever splits are asked for.
    corpus = mix(open_corpus(cfg, [cfg.train_split, *names]), cfg)
    tokenizer_key = _hash(CACHE_VERSION, tokenizers.__version__, corpus.key(cfg.train_split),
                          cfg.src_lang, cfg.tgt_lang, cfg.vocab_size, cfg.joint_vocab,
                          cfg.lowercase, *_sample_key(cfg), *_pairs_key(cfg))
    cache = Path(cfg.cache_dir) / f"{cfg.source}-{directions_name(cfg)}-{tokenizer_key}"
    if given_tokenizers is None:
        tokenizer_pair = _tokenizers(cfg, corpus, cache, log)
    else:
        tokenizer_pair, given_hash = given_tokenizers, tokenizer_hash(given_tokenizers)
        # A resumed run gives the tokenizer that its first start trained: then that start's
        # cache is reused. Any other tokenizer gets a folder keyed by its content.
        if _cached_tokenizers_hash(cfg, cache) != given_hash:
            given_key = _hash(CACHE_VERSION, "given", given_hash)
            cache = cache.with_name(f"{cfg.source}-{directions_name(cfg)}-{given_key}")
    encoded = {name: _encoded_split(cfg, corpus, name, tokenizer_pair, cache, log)
               for name in names}
    return TranslationData(*tokenizer_pair, encoded, cache)


def _pairs_key(cfg: DataConfig) -> list[Any]:
    """data.pairs, in the key only when set: one-direction caches keep their keys."""
    return [["pairs", list(cfg.pairs)]] if getattr(cfg, "pairs", None) else []


def _sample_key(cfg: DataConfig) -> list[Any]:
    sample = getattr(cfg, "tokenizer_sample", DEFAULT_TOKENIZER_SAMPLE)
    return [] if sample == DEFAULT_TOKENIZER_SAMPLE else [["tokenizer_sample", sample]]


def tokenizer_sample(chunks: Iterable[tuple[list[str], list[str]]], size: int | None
                     ) -> Iterable[tuple[list[str], list[str]]]:
    """At most ``size`` pairs of ``chunks``, in corpus order: all of them when there are
    no more (Multi30k), else a uniform sample, seeded, so the same corpus gives the same
    tokenizer (reservoir sampling: memory holds the sample, never the corpus)."""
    if size is None:
        yield from chunks
        return
    reservoir: list[tuple[int, str, str]] = []
    rng, seen = random.Random(0), 0
    for src_texts, tgt_texts in chunks:
        for src, tgt in zip(src_texts, tgt_texts, strict=True):
            if seen < size:
                reservoir.append((seen, src, tgt))
            else:
                slot = rng.randrange(seen + 1)
                if slot < size:
                    reservoir[slot] = (seen, src, tgt)
            seen += 1
    reservoir.sort(key=itemgetter(0))  # by position only: comparing tuples took 8 s at 1M
    for start in range(0, len(reservoir), 10_000):
        part = reservoir[start:start + 10_000]
        yield [src for _, src, _ in part], [tgt for _, _, tgt in part]


def tokenizer_hash(tokenizer_pair: tuple[Any, Any]) -> str:
    """A hash of what the ``(src, tgt)`` tokenizers do: their whole serialized form."""
    return _hash(*[(type(t).__name__, getattr(t, "side", None), t.to_str())
                   for t in tokenizer_pair])


def _cached_tokenizers_hash(cfg: DataConfig, cache: Path) -> str | None:
    """``tokenizer_hash`` of the tokenizer(s) saved in ``cache``, None if there are none."""
    names = ["tokenizer.json"] * 2 if cfg.joint_vocab else ["src_tokenizer.json",
                                                             "tgt_tokenizer.json"]
    if not all((cache / name).exists() for name in names):
        return None
    return tokenizer_hash([Tokenizer.from_file(cache / name) for name in names])


def _check_cache_dir(cache_dir: str) -> None:
    """Fail before any slow work, naming the key, if the cache cannot be made there (a file
    in the way, no permission); creates nothing, so bad data leaves no folder behind."""
    path = Path(cache_dir).absolute()
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"data.cache_dir={cache_dir} cannot be written: {existing} is not a "
                        "writable folder")


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _tokenizers(cfg: DataConfig, corpus: Corpus, cache: Path,
                log: Callable[[str], Any]) -> tuple[Tokenizer, Tokenizer]:
    """The cached tokenizer(s) of this key, or new ones trained on the training split."""
    sides = {"tokenizer.json": (0, 1)} if cfg.joint_vocab else {"src_tokenizer.json": (0,),
                                                                "tgt_tokenizer.json": (1,)}
    loaded = []
    for name, side in sides.items():
        path = cache / name
        if path.exists():
            log(f"tokenizer: loaded {path}")
        else:
            start = time.perf_counter()
            mixed = isinstance(corpus, MixedCorpus)  # each corpus of a mix once, unweighted
            chunks = corpus.chunks(cfg.train_split, weighted=False) if mixed \
                else corpus.chunks(cfg.train_split)
            tags = getattr(corpus, "tags", []) if 0 in side else []  # mix and language tags
            chunks = tokenizer_sample(chunks, getattr(cfg, "tokenizer_sample",
                                                      DEFAULT_TOKENIZER_SAMPLE))
            texts = (text for chunk in chunks for i in side for text in chunk[i])
            # the same tokenizer as Tokenizer.train(texts, ...), some 2 times faster
            tokenizer = Tokenizer.train_from_counts(count_pieces(texts, cfg.lowercase),
                                                    cfg.vocab_size, cfg.lowercase, tags=tags)
            cache.mkdir(parents=True, exist_ok=True)  # only now: bad data leaves no folder
            _write_once(path, tokenizer.save)
            log(f"tokenizer: trained {tokenizer.vocab_size} BPE tokens on the "
                f"{cfg.train_split} split in {time.perf_counter() - start:.1f} s, saved to {path}")
        loaded.append(Tokenizer.from_file(path))
    return loaded[0], loaded[-1]


def _write_once(path: Path, write: Callable[[Path], Any]) -> None:
    """Give ``path`` the content ``write`` makes, unless another process (a rank of the same
    distributed run) got there first: then everyone uses the first file, whole."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")
    write(partial)
    try:
        os.link(partial, path)  # unlike a rename, never replaces a file others have read
    except FileExistsError:
        pass
    finally:
        partial.unlink()


def _encoded_split(cfg: DataConfig, corpus: Corpus, split: str,
                   tokenizer_pair: tuple[Tokenizer, Tokenizer], cache: Path,
                   log: Callable[[str], Any]) -> EncodedSplit:
    start = time.perf_counter()
    # The tokenizer is part of the key: a split is never read with another tokenizer than
    # the one that encoded it, whatever replaced a tokenizer file beside it.
    key = _hash(corpus.key(split), split == cfg.train_split, cfg.max_len, cfg.allow_long_eval,
                tokenizer_hash(tokenizer_pair))
    directory = cache / f"{split}-{key}"
    if (directory / "stats.json").exists():  # written last: the split is complete
        stats = SplitStats(**{**json.loads((directory / "stats.json").read_text()),
                              "cached": True})
    else:
        stats = _encode_to_cache(_SplitEncoder(cfg, corpus, split, tokenizer_pair), directory)
    fields = {name: Ragged.load(directory / name, text) for name, text in FIELDS.items()}
    stats.seconds = time.perf_counter() - start
    log(f"{split}: {stats.kept} of {stats.read} pairs kept, dropped {dropped_text(stats)}; "
        f"from {'cache' if stats.cached else 'corpus'}, {directory}")
    return EncodedSplit(split, stats=stats, **fields)


def _encode_to_cache(encoder: _SplitEncoder, directory: Path) -> SplitStats:
    """Encode a split into a temporary folder, then rename it into place: a folder with
    ``stats.json`` is always a complete split, whatever interrupted an earlier run."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        _write_split(encoder, partial)
        try:
            os.rename(partial, directory)
        except OSError:  # fine if another rank finished the same split first
            if not (directory / "stats.json").exists():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone already after the rename
    return encoder.stats


def _write_split(encoder: _SplitEncoder, folder: Path) -> None:
    writers = [_RaggedWriter(folder / name, text) for name, text in FIELDS.items()]
    offset = 0  # of the chunk's first pair in the split, for error messages
    try:
        for src_texts, tgt_texts in encoder.corpus.chunks(encoder.split):
            columns = encoder.encode(src_texts, tgt_texts, offset)
            for writer, rows in zip(writers, columns, strict=True):
                writer.add(rows)
            offset += len(src_texts)
    finally:
        for writer in writers:
            writer.close()
    (folder / "stats.json").write_text(json.dumps(asdict(encoder.stats)))


@dataclass
class _SplitEncoder:
    """Filters and encodes one split, chunk by chunk, counting what it keeps and drops."""

    cfg: DataConfig
    corpus: Corpus
    split: str
    tokenizer_pair: tuple[Tokenizer, Tokenizer]
    stats: SplitStats = field(init=False)
    encoders: list[FlatEncoder] = field(init=False)

    def __post_init__(self) -> None:
        self.stats = SplitStats(self.split)
        src, tgt = self.tokenizer_pair
        self.encoders = [flat_encoder(src)]  # a joint vocabulary shares one word cache
        self.encoders.append(self.encoders[0] if tgt is src else flat_encoder(tgt))

    def encode(self, src_texts: list[str], tgt_texts: list[str], offset: int) -> list:
        """The kept ``[src_ids, tgt_ids, src_text, tgt_text]`` of a chunk whose first pair is
        pair ``offset`` of the split: empty pairs dropped, over-long ones handled. Ids are
        ``(ids, lengths)`` flat arrays (``FlatEncoder``), texts lists of str."""
        self.stats.read += len(src_texts)
        indices = [i for i, (src, tgt) in enumerate(zip(src_texts, tgt_texts, strict=True))
                   if src.strip() and tgt.strip()]
        self.stats.dropped["empty"] += len(src_texts) - len(indices)
        if len(indices) < len(src_texts):
            src_texts, tgt_texts = [src_texts[i] for i in indices], [tgt_texts[i] for i in indices]
        ids = [encode(side) for encode, side in zip(self.encoders, (src_texts, tgt_texts),
                                                    strict=True)]
        columns = self._limit_length([*ids, src_texts, tgt_texts], indices, offset)
        (_, src_lengths), (_, tgt_lengths) = columns[:2]
        self.stats.kept += len(src_lengths)
        self.stats.src_tokens += int(src_lengths.sum())
        self.stats.tgt_tokens += int(tgt_lengths.sum())
        return columns

    def _limit_length(self, columns: list, indices: list[int], offset: int) -> list:
        """Pairs over ``max_len`` tokens: dropped from train, truncated in val/test when
        ``allow_long_eval``, an error otherwise (a test set must not shrink silently)."""
        max_len, ((_, src_lengths), (_, tgt_lengths)) = self.cfg.max_len, columns[:2]
        too_long = np.maximum(src_lengths, tgt_lengths) > max_len  # (N,)
        if not too_long.any():
            return columns
        if self.split == self.cfg.train_split:
            self.stats.dropped["too_long"] += int(too_long.sum())
            keep = ~too_long
            return [*[(ids[np.repeat(keep, lengths)], lengths[keep]) for ids, lengths
                      in columns[:2]],
                    *[list(compress(texts, keep.tolist())) for texts in columns[2:]]]
        if self.cfg.allow_long_eval:
            self.stats.truncated += int(too_long.sum())
            return [*[_truncated(ids, lengths, max_len) for ids, lengths in columns[:2]],
                    *columns[2:]]
        j = int(np.flatnonzero(too_long)[0])
        raise DataError(f"{self.corpus.where(self.split, offset + indices[j])}: "
                        f"{src_lengths[j]} source / {tgt_lengths[j]} target tokens, more than "
                        f"data.max_len={max_len}; set data.allow_long_eval=true to keep such "
                        f"{self.split} pairs truncated")


def _truncated(ids: np.ndarray, lengths: np.ndarray, max_len: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Each row of the flat ``(ids, lengths)`` cut to its first ``max_len`` ids."""
    starts = np.cumsum(lengths) - lengths
    place = np.arange(len(ids)) - np.repeat(starts, lengths)  # (T,) index within its row
    return ids[place < max_len], np.minimum(lengths, max_len)
