"""Encoded splits on disk: ids and texts stored flat and memory-mapped, as in fairseq's
indexed datasets, with what reading each split kept and dropped."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transformer.tokenizer import Tokenizer


class Ragged(Sequence):
    """Rows of different lengths stored flat, like fairseq's indexed datasets: row i is
    ``values[offsets[i]:offsets[i + 1]]``. Indexing gives a ``list[int]`` of ids, or a
    ``str`` when ``text``; a slice gives a list of those."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray, text: bool = False) -> None:
        self.values, self.offsets, self.text = values, offsets, text

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = self.row(index)
        return row.tobytes().decode("utf-8") if self.text else row.tolist()

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self)))

    def row(self, index: int) -> np.ndarray:
        """Row ``index`` as a numpy view (no copy)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        index %= len(self)
        return self.values[self.offsets[index]:self.offsets[index + 1]]

    @property
    def lengths(self) -> np.ndarray:
        """(N,) the length of every row (tokens, or UTF-8 bytes for text)."""
        return np.diff(self.offsets)

    @classmethod
    def load(cls, path: Path, text: bool = False) -> Ragged:
        """Memory-map ``path.bin`` (values) and read ``path.idx.npy`` (offsets)."""
        dtype = np.uint8 if text else np.int32
        values_path = path.with_suffix(".bin")
        # numpy cannot map an empty file
        values = (np.memmap(values_path, dtype=dtype, mode="r")
                  if values_path.stat().st_size else np.empty(0, dtype))
        return cls(values, np.load(path.with_suffix(".idx.npy")), text)


class _RaggedWriter:
    """Appends rows to ``path.bin`` as they come, and their end offsets to a raw file that
    becomes ``path.idx.npy`` at ``close``: a streamed split never sits in memory, not even
    its lengths (millions of Python ints would)."""

    def __init__(self, path: Path, text: bool = False) -> None:
        self.path, self.text = path, text
        self._file = open(path.with_suffix(".bin"), "wb")  # noqa: SIM115 -- closed in close()
        self._ends = open(path.with_suffix(".ends"), "wb")  # noqa: SIM115 -- closed in close()
        self._rows, self._end = 0, 0

    def add(self, rows: Sequence[str] | tuple[np.ndarray, np.ndarray]) -> None:
        """Append text rows (a list of str), or id rows given flat: ``(ids, lengths)``."""
        if self.text:
            encoded = list(map(str.encode, rows))
            lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
            flat = b"".join(encoded)
        else:
            ids, lengths = rows
            flat = np.ascontiguousarray(ids, "<i4").tobytes()
        self._file.write(flat)
        ends = self._end + np.cumsum(np.asarray(lengths, np.int64), dtype=np.int64)
        self._ends.write(ends.astype("<i8").tobytes())
        self._rows += len(lengths)
        self._end = int(ends[-1]) if len(ends) else self._end

    def close(self) -> None:
        """Write ``path.idx.npy`` (offsets, a leading 0 then every row's end) from the raw
        ends, a block at a time."""
        self._file.close()
        self._ends.close()
        ends_path = self.path.with_suffix(".ends")
        header = {"descr": "<i8", "fortran_order": False, "shape": (self._rows + 1,)}
        with open(self.path.with_suffix(".idx.npy"), "wb") as out, open(ends_path, "rb") as ends:
            np.lib.format.write_array_header_1_0(out, header)
            out.write(np.zeros(1, "<i8").tobytes())
            while block := ends.read(1 << 22):
                out.write(block)
        ends_path.unlink()


FIELDS = {"src_ids": False, "tgt_ids": False, "src_text": True, "tgt_text": True}  # name: text


@dataclass
class SplitStats:
    """What reading one split did: pairs read, kept, dropped by reason, tokens, time."""

    split: str
    read: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {"empty": 0, "too_long": 0})
    truncated: int = 0  # over-long val/test pairs kept (data.allow_long_eval)
    src_tokens: int = 0  # BPE tokens of the kept pairs, without <s> and </s>
    tgt_tokens: int = 0
    seconds: float = 0.0
    cached: bool = False


@dataclass
class EncodedSplit:
    """One split, encoded: ``src_ids[i]``/``tgt_ids[i]`` (ids without specials) translate
    each other, and ``src_text[i]``/``tgt_text[i]`` are the raw lines (BLEU references).
    The four behave as read-only lists; ``src_ids.lengths`` gives all lengths at once."""

    name: str
    src_ids: Ragged
    tgt_ids: Ragged
    src_text: Ragged
    tgt_text: Ragged
    stats: SplitStats

    def __len__(self) -> int:
        return len(self.src_ids)


@dataclass
class TranslationData:
    """The tokenizers (one object for both sides with a joint vocabulary) and the splits."""

    src_tokenizer: Tokenizer
    tgt_tokenizer: Tokenizer
    splits: dict[str, EncodedSplit]
    cache_dir: Path | None = None

    def stats_table(self) -> str:
        """One line per split: read, kept, dropped (why), tokens, vocab size, seconds."""
        vocab = str(self.src_tokenizer.vocab_size)
        if self.tgt_tokenizer is not self.src_tokenizer:
            vocab += f"/{self.tgt_tokenizer.vocab_size}"
        header = (f"{'split':<18}{'read':>8}{'kept':>8}  {'dropped':<26}{'src tokens':>11}"
                  f"{'tgt tokens':>11}{'vocab':>12}{'seconds':>9}  source")
        return "\n".join([header] + [_stats_line(split.stats, vocab)
                                     for split in self.splits.values()])


def _stats_line(stats: SplitStats, vocab: str) -> str:
    dropped = dropped_text(stats)
    return (f"{stats.split:<18}{stats.read:>8}{stats.kept:>8}  {dropped:<26}"
            f"{stats.src_tokens:>11}{stats.tgt_tokens:>11}{vocab:>12}{stats.seconds:>9.2f}  "
            f"{'cache' if stats.cached else 'corpus'}")


def dropped_text(stats: SplitStats) -> str:
    """How many pairs of a split were dropped, and why: "5 (3 empty, 2 too long)"; over-long
    val/test pairs that were truncated and kept are named too."""
    reasons = [f"{n} {why.replace('_', ' ')}" for why, n in stats.dropped.items() if n]
    if stats.truncated:
        reasons.append(f"{stats.truncated} truncated, kept")
    return f"{sum(stats.dropped.values())}" + (f" ({', '.join(reasons)})" if reasons else "")
