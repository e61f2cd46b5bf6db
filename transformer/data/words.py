"""Encoding millions of sentences with the framework's byte-level BPE, fast and exactly: each
distinct word is encoded once, and a sentence's ids are its words' ids one after the other.

Why that is exact: the tokenizer (``transformer/tokenizer.py``) normalizes a sentence
(NFKC, whitespace runs -> one space, no space at either end), puts a space before it, and
splits it with GPT-2's pattern into pieces that each start with at most one space and
never hold one inside; BPE then works on each piece alone. So in ``" w1 w2 w3"`` no piece
crosses a space, and ``encode("w1 w2 w3") == encode("w1") + encode("w2") + encode("w3")``.
Encoding a sentence through the whole pipeline costs some 50 us on this CPU (byte-level
regex, offsets, an ``Encoding`` object per sentence); looking its words up costs a few.

Normalization is done in Python only where Python's result is the tokenizer's, checked
character by character in ``tests/test_words.py``: text whose characters are all below
U+0300 (ASCII, Latin-1, Latin Extended, IPA: no combining marks, and NFKC mappings that
have not changed since Unicode 3), without the four separators U+001C-U+001F that Python
takes for whitespace and the tokenizer does not. Anything else (typographic quotes, other
scripts, a special token such as ``</s>`` in the text or made by NFKC) goes through the
tokenizer, sentence by sentence, as before; a special token at the very start (a language
tag, ``<2de>``) is split off first, by the tokenizer too, so it is one more word.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import chain, compress, islice, repeat
from typing import Any

import numpy as np
import tokenizers
from tokenizers import models, pre_tokenizers

WORD_CACHE_SIZE = 1 << 20  # distinct words remembered: ~100 MiB at most, whatever the corpus
_NOT_SPACES = "\x1c\x1d\x1e\x1f"  # whitespace to Python's str.split, not to the tokenizer
_FROM_COMBINING = re.compile("[\u0300-\U0010ffff]")  # marks, and all that follows them


def flat_encoder(tokenizer: Any) -> FlatEncoder:
    """The fastest exact encoder of ``tokenizer`` (a ``Tokenizer``, or any object with
    ``encode_batch``): word by word for the framework's byte-level BPE pipeline, else
    sentence by sentence through ``encode_batch``."""
    hf = getattr(tokenizer, "_tokenizer", None)
    lowercase = _byte_level_bpe_lowercase(hf) if isinstance(hf, tokenizers.Tokenizer) else None
    if lowercase is None:
        return FlatEncoder(tokenizer)
    return WordEncoder(tokenizer, hf, lowercase)


def normalize(text: str, lowercase: bool) -> str | None:
    """The tokenizer's normalization of ``text`` where Python's is the same (see the module
    docstring), else None; U+001C-U+001F are left to the caller to look for."""
    if not text.isascii():
        if _FROM_COMBINING.search(text):
            return None
        text = unicodedata.normalize("NFKC", text)
    if lowercase:
        text = text.lower()
    return " ".join(text.split())


def count_pieces(texts: Iterable[str], lowercase: bool) -> Counter[str]:
    """How often BPE training would see each byte-level piece (``"Ġdog"``) in ``texts``:
    the counts that ``Tokenizer.train_from_counts`` learns from. Words are counted in Python
    and split into pieces once each; texts outside ``normalize``'s reach go through the
    tokenizer's own normalizer and pre-tokenizer, one by one."""
    from transformer.tokenizer import _normalizer

    words: Counter[str] = Counter()
    pieces: Counter[str] = Counter()
    normalizer, pre_tokenizer = _normalizer(lowercase), _pre_tokenizer()
    iterator = iter(texts)
    while chunk := list(islice(iterator, 10_000)):
        normalized = [normalize(text, lowercase) for text in chunk]
        raw = "\n".join(chunk)
        if any(separator in raw for separator in _NOT_SPACES):  # rare: look closer
            normalized = [None if any(sep in text for sep in _NOT_SPACES) else norm
                          for text, norm in zip(chunk, normalized, strict=True)]
        words.update(" ".join(norm for norm in normalized if norm is not None).split(" "))
        for text, norm in zip(chunk, normalized, strict=True) if None in normalized else ():
            if norm is None:
                pieces.update(piece for piece, _ in
                              pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    words.pop("", None)  # of empty texts, which have no pieces
    for word, count in words.items():
        for piece, _ in pre_tokenizer.pre_tokenize_str(word):
            pieces[piece] += count
    return pieces


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=True)


class FlatEncoder:
    """Encodes sentences through ``tokenizer.encode_batch``; ids come back flat."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, lengths)``: (sum(lengths),) int32 ids of all ``texts`` one after the other,
        and (len(texts),) int64 lengths; no special tokens."""
        return _flatten(self.tokenizer.encode_batch(list(texts)))


class WordEncoder(FlatEncoder):
    """Encodes with a byte-level BPE tokenizer word by word, through a bounded cache of the
    words' ids (see the module docstring for why the ids are the same)."""

    def __init__(self, tokenizer: Any, hf: tokenizers.Tokenizer, lowercase: bool,
                 cache_size: int = WORD_CACHE_SIZE) -> None:
        super().__init__(tokenizer)
        self.hf, self.lowercase, self.cache_size = hf, lowercase, cache_size
        # Texts holding one of these are encoded whole: the tokenizer finds added tokens
        # (<s>, </s>, tags) in the raw text and again after normalization.
        added = hf.get_added_tokens_decoder().values()
        self.needles = [token.content for token in added]
        # ... except one at the very start (a language or mix tag, <2de> <BT>): the
        # tokenizer splits it off first and encodes the rest as a text of its own, so it is
        # one more word. Longest first: the tokenizer takes the longest match.
        self.leading = tuple(sorted(
            (token.content for token in added if token.content.strip() == token.content != ""
             and not (token.normalized or token.lstrip or token.rstrip or token.single_word)
             and len(token.content.split()) == 1), key=len, reverse=True))
        self.index: dict[str, int] = {"": 0}  # word -> its row in the table
        self.table = _Table()
        self.table.append([[]])  # row 0: the empty word of an empty text

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if not texts:
            return np.zeros(0, np.int32), np.zeros(0, np.int64)
        tags, rests = self._leading_tags(texts)
        normalized = [normalize(text, self.lowercase) for text in rests]
        whole = self._whole(rests, normalized)  # the texts to encode through the tokenizer
        if tags:
            skip = set(whole)
            for i, tag in enumerate(tags):
                if tag and i not in skip:
                    normalized[i] = " ".join(filter(None, (tag, normalized[i])))
        for i in whole:
            normalized[i] = ""  # one empty word, replaced by the text's own row below
        # (W,) every word of the chunk, the first word of each text at first_words
        words = " ".join(normalized).split(" ")
        word_counts = np.fromiter((text.count(" ") + 1 for text in normalized), np.int64,
                                  len(normalized))
        first_words = np.cumsum(word_counts) - word_counts
        rows = np.fromiter(map(self.index.get, words, repeat(-1)), np.int64, len(words))
        registered = len(self.table)
        self._add_missing(words, rows)
        if whole:
            first = self.table.append(self.hf.encode_batch_fast(
                [texts[i] for i in whole], add_special_tokens=False))
            rows[first_words[whole]] = np.arange(first, first + len(whole))
        ids, lengths = self.table.gather(rows, first_words)
        self._forget_beyond(registered)
        return ids, lengths

    def _leading_tags(self, texts: Sequence[str]) -> tuple[list[str] | None, Sequence[str]]:
        """The added token each text starts with ("" if none), and the texts without it;
        None and ``texts`` when no text starts with one."""
        if not self.leading or not any(text.startswith(self.leading) for text in texts):
            return None, texts
        tags = [next((tag for tag in self.leading if text.startswith(tag)), "")
                if text.startswith(self.leading) else "" for text in texts]
        return tags, [text[len(tag):] for text, tag in zip(texts, tags, strict=True)]

    def _whole(self, texts: Sequence[str], normalized: list[str | None]) -> list[int]:
        """Indices of the texts that must be encoded through the tokenizer."""
        whole = [i for i, text in enumerate(normalized) if text is None]
        raw, done = "\n".join(texts), "\n".join(text or "" for text in normalized)
        needles = [*self.needles, *_NOT_SPACES]
        if any(needle in raw or needle in done for needle in needles):  # rare: look closer
            whole = [i for i, (text, norm) in enumerate(zip(texts, normalized, strict=True))
                     if norm is None or any(n in text or n in norm for n in needles)]
        return whole

    def _add_missing(self, words: list[str], rows: np.ndarray) -> None:
        """Encode the words not in the cache, once each, and point ``rows`` at them."""
        missing = rows < 0
        if not missing.any():
            return
        missing_words = list(compress(words, missing.tolist()))
        new_words = list(dict.fromkeys(missing_words))
        first = self.table.append(self.hf.encode_batch_fast(new_words,
                                                            add_special_tokens=False))
        new = dict(zip(new_words, range(first, first + len(new_words)), strict=True))
        rows[missing] = np.fromiter(map(new.__getitem__, missing_words), np.int64,
                                    len(missing_words))
        kept = new_words[:max(0, self.cache_size - len(self.index))]
        self.index.update(zip(kept, range(first, first + len(kept)), strict=True))

    def _forget_beyond(self, registered: int) -> None:
        """Drop the table rows of this chunk that the cache does not keep."""
        self.table.truncate(max(registered, len(self.index)))


class _Table:
    """Rows of ids stored flat in growing arrays: row r is
    ``ids[starts[r]:starts[r] + lengths[r]]``."""

    def __init__(self) -> None:
        self.ids = np.empty(1 << 16, np.int32)
        self.starts = np.zeros(1 << 12, np.int64)
        self.lengths = np.zeros(1 << 12, np.int64)
        self.rows, self.size = 0, 0  # rows used, ids used

    def __len__(self) -> int:
        return self.rows

    def append(self, encodings: Sequence[Any]) -> int:
        """Append one row per encoding (an ``Encoding`` or a list of ids); the first new row."""
        ids, lengths = _flatten(encodings)
        first, end = self.rows, self.rows + len(lengths)
        self.starts = _fit(self.starts, end)
        self.lengths = _fit(self.lengths, end)
        self.ids = _fit(self.ids, self.size + len(ids))
        self.starts[first:end] = self.size + np.cumsum(lengths) - lengths
        self.lengths[first:end] = lengths
        self.ids[self.size:self.size + len(ids)] = ids
        self.rows, self.size = end, self.size + len(ids)
        return first

    def truncate(self, rows: int) -> None:
        if rows < self.rows:
            self.size = int(self.starts[rows])
            self.rows = rows

    def gather(self, rows: np.ndarray, first_words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ids of the word ``rows`` one after the other, and the lengths of the texts
        whose words start at ``first_words``."""
        lengths = self.lengths[rows]  # (W,) ids per word
        ends = np.cumsum(lengths)
        # (T,) position in self.ids of each output id: its word's start, plus its place in it
        positions = np.arange(int(ends[-1]) if len(ends) else 0) + np.repeat(
            self.starts[rows] - (ends - lengths), lengths)
        text_lengths = (np.add.reduceat(lengths, first_words) if len(first_words)
                        else np.zeros(0, np.int64))
        return self.ids[positions], text_lengths


def _fit(array: np.ndarray, size: int) -> np.ndarray:
    """``array`` or a copy twice as long, whichever holds ``size`` items."""
    if size <= len(array):
        return array
    grown = np.empty(max(size, 2 * len(array)), array.dtype)
    grown[:len(array)] = array
    return grown


def _flatten(encodings: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, lengths)`` of encodings or id lists: (sum,) int32 and (N,) int64."""
    rows = [getattr(encoding, "ids", encoding) for encoding in encodings]
    lengths = np.fromiter(map(len, rows), np.int64, len(rows))
    ids = np.fromiter(chain.from_iterable(rows), np.int32, int(lengths.sum()))
    return ids, lengths


def _byte_level_bpe_lowercase(hf: tokenizers.Tokenizer) -> bool | None:
    """Whether ``hf`` lowercases, if it is the framework's byte-level BPE pipeline (its
    normalizer, GPT-2's pre-tokenizer, BPE without dropout); None for any other."""
    from transformer.tokenizer import _normalizer  # the pipeline this module relies on

    spec = json.loads(hf.to_str())
    model = spec.get("model") or {}
    if (model.get("type") != "BPE" or model.get("dropout") is not None
            or spec.get("truncation") or spec.get("padding")
            or spec.get("post_processor") not in (None, {})
            and spec["post_processor"].get("type") != "ByteLevel"):
        return None
    for lowercase in (False, True):
        reference = tokenizers.Tokenizer(models.BPE())
        reference.normalizer = _normalizer(lowercase)
        reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        expected = json.loads(reference.to_str())
        if (spec.get("normalizer") == expected["normalizer"]
                and _without_offsets(spec.get("pre_tokenizer"))
                == _without_offsets(expected["pre_tokenizer"])):
            return lowercase
    return None


def _without_offsets(spec: dict | None) -> dict | None:
    return None if spec is None else {k: v for k, v in spec.items() if k != "trim_offsets"}
