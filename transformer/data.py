"""Translation data: parallel corpora -> cached BPE ids -> batches bounded by token count.

``prepare_data(cfg)`` reads the corpus that ``cfg.source`` names, one split at a time:

- ``multi30k``: the Multi30K Task 1 files ``{split}.{lang}.gz`` in ``cfg.root`` (by default
  ``$MULTI30K_DIR``), downloaded into ``cfg.cache_dir/multi30k`` when that is not set;
- ``parallel_files``: ``cfg.root / cfg.file_pattern`` per split and language, plain or .gz;
- ``hub``: a Hugging Face dataset (a Hub id or a local folder) with a ``translation`` column,
  read through ``datasets``, streamed when ``cfg.streaming``.

Text files are read here, not with ``datasets``' ``text`` loader: that loader also ends a
line at a lone ``\\r``, which silently shifts one side against the other, and its UTF-8
errors do not say where. ``read_lines`` splits at ``\\n`` only (a ``\\r`` before it goes),
decodes strictly, and names the file and line of any byte that is not UTF-8.

It trains the BPE tokenizer on the training split (``transformer.tokenizer``), encodes every
split, drops empty pairs and over-long training pairs, and caches both under
``cfg.cache_dir/<key>/``, where the key hashes the files' paths, sizes and modification times
(or the Hub id) and the options, and each split's folder also the tokenizer that encoded
it: a second run loads the tokenizer and ids in well under a second. Ids are stored flat,
as in fairseq's indexed datasets, and memory-mapped.

Sequences follow fairseq: source = ids + ``</s>``; target input = ``<s>`` + ids; target
output = ids + ``</s>``. ``TokenBatchSampler`` groups pairs of similar length into batches of
at most ``max_tokens`` padded tokens per side; ``collate`` pads them into a ``Batch``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tokenizers

from transformer.config import DataConfig
from transformer.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

if TYPE_CHECKING:
    import torch

SOURCES = ("multi30k", "parallel_files", "hub")
MULTI30K_URL = "https://github.com/multi30k/dataset/raw/master/data/task1/raw/{file}"
MULTI30K_PATTERN = "{split}.{lang}"
CHUNK_PAIRS = 10_000  # pairs encoded at once: bounds memory when a corpus is streamed
CACHE_VERSION = 1  # bump when the cached format or the encoding changes


class DataError(ValueError):
    """Data that cannot be used; the one-line message names the file, line, split or key."""


# ----------------------------------------------------------------------------- text files

def read_parallel_lines(src_path: str | Path, tgt_path: str | Path
                        ) -> tuple[list[str], list[str]]:
    """The lines of two parallel files, which must have as many lines each."""
    src_lines, tgt_lines = read_lines(src_path), read_lines(tgt_path)
    if len(src_lines) != len(tgt_lines):
        raise DataError(f"line counts differ: {src_path} has {len(src_lines)} lines, "
                        f"{tgt_path} has {len(tgt_lines)}")
    return src_lines, tgt_lines


def read_lines(path: str | Path) -> list[str]:
    """The lines of a plain or .gz UTF-8 text file, split at ``\\n`` only, without the
    ``\\n`` or a ``\\r`` before it; a lone ``\\r`` stays inside its line."""
    path = Path(path)
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}:{line}: bytes that are not UTF-8 "
                        f"({data[error.start:error.start + 4]!r})") from None
    lines = text.removeprefix("\ufeff").split("\n")
    if lines[-1] == "":  # the newline that ends the last line opens no new one
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:  # no permission, a folder of that name, an I/O error
        raise DataError(f"{path}: cannot read it ({error.strerror or error})") from None
    if path.suffix != ".gz":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: not a readable gzip file ({error})") from None


# ----------------------------------------------------------------------------- corpora

class FileCorpus:
    """Parallel text files ``root / pattern.format(split=..., lang=...)``, plain or .gz;
    line i of the source file translates line i of the target file."""

    def __init__(self, root: Path, pattern: str, src_lang: str, tgt_lang: str) -> None:
        self.root, self.pattern, self.langs = root, pattern, (src_lang, tgt_lang)
        self._lines: dict[str, tuple[list[str], list[str]]] = {}

    @cached_property
    def splits(self) -> list[str]:
        """The splits that have a file for both languages."""
        found = [set(self._splits_of(lang)) for lang in self.langs]
        return sorted(found[0] & found[1])

    def _splits_of(self, lang: str) -> Iterator[str]:
        relative = self.pattern.format(split="\0", lang=lang)
        regex = re.compile(re.escape(relative).replace("\0", "(.+)") + r"(\.gz)?")
        for path in self.root.glob(relative.replace("\0", "*") + "*"):
            match = regex.fullmatch(path.relative_to(self.root).as_posix())
            if match:
                yield match.group(1)

    def check(self, splits: Iterable[str]) -> None:
        for split in splits:
            if split not in self.splits:
                raise DataError(f"split {split!r} not found for {'-'.join(self.langs)} in "
                                f"{self.root / self.pattern}; splits found: "
                                f"{', '.join(self.splits) or 'none'}")

    def paths(self, split: str) -> tuple[Path, Path]:
        self.check([split])
        plain = [self.root / self.pattern.format(split=split, lang=lang) for lang in self.langs]
        return tuple(p if p.exists() else p.with_name(p.name + ".gz") for p in plain)

    def key(self, split: str) -> list[Any]:
        """What identifies the split's content for the cache: paths, sizes, mtimes."""
        return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns]
                for p in self.paths(split)]

    def chunks(self, split: str) -> Iterator[tuple[list[str], list[str]]]:
        src_lines, tgt_lines = self._read(split)
        for start in range(0, len(src_lines), CHUNK_PAIRS):
            yield src_lines[start:start + CHUNK_PAIRS], tgt_lines[start:start + CHUNK_PAIRS]

    def _read(self, split: str) -> tuple[list[str], list[str]]:
        if split not in self._lines:  # the training split is read twice: BPE, then ids
            self._lines[split] = read_parallel_lines(*self.paths(split))
        return self._lines[split]

    def where(self, split: str, index: int) -> str:
        src_path, tgt_path = self.paths(split)
        return f"line {index + 1} of {src_path} and {tgt_path}"


class HubCorpus:
    """A Hugging Face dataset whose ``translation`` column holds ``{lang: text}`` dicts.
    ``name`` is a Hub id (``wmt/wmt14``) or a local folder: JSON/Parquet/... files that
    ``load_dataset`` understands, or the output of ``Dataset(Dict).save_to_disk``."""

    def __init__(self, cfg: DataConfig) -> None:
        if not cfg.hub_name:
            raise DataError("data.hub_name is not set: name a Hugging Face dataset, "
                            "e.g. data.hub_name=wmt/wmt14 data.hub_config=de-en")
        self.name, self.config, self.streaming = cfg.hub_name, cfg.hub_config, cfg.streaming
        self.langs = (cfg.src_lang, cfg.tgt_lang)
        self.cache_dir = str(Path(cfg.cache_dir) / "hub")

    @cached_property
    def _dataset_dict(self) -> Any:
        import datasets  # slow to import, and only needed here

        if (Path(self.name) / "dataset_dict.json").exists():  # memory-mapped: no streaming
            return datasets.load_from_disk(self.name)
        try:
            return datasets.load_dataset(self.name, self.config, streaming=self.streaming,
                                         cache_dir=self.cache_dir)
        except Exception as error:  # of many types (ConnectionError, FileNotFoundError, ...)
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise DataError(f"cannot load hub dataset {self.name!r} (config {self.config}): "
                            f"{type(error).__name__}: {reason}") from None

    @property
    def splits(self) -> list[str]:
        return list(self._dataset_dict)

    def check(self, splits: Iterable[str]) -> None:
        for split in splits:
            if split not in self.splits:
                raise DataError(f"split {split!r} not found in hub dataset {self.name!r}; "
                                f"splits found: {', '.join(self.splits)}")

    def key(self, split: str) -> list[Any]:
        """Hub id, config and split; for a local folder also its files' sizes and mtimes.
        A Hub dataset is taken not to change: delete its cache folder to read it again."""
        local = Path(self.name)
        files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else []
        stats = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
        return [self.name, self.config, split, stats]

    def chunks(self, split: str) -> Iterator[tuple[list[str], list[str]]]:
        self.check([split])
        for batch in self._dataset_dict[split].iter(batch_size=CHUNK_PAIRS):
            if "translation" not in batch:
                raise DataError(f"hub dataset {self.name!r} has no 'translation' column "
                                f"(columns: {', '.join(batch)})")
            rows = batch["translation"]
            for lang in self.langs:
                if rows and lang not in rows[0]:
                    raise DataError(f"hub dataset {self.name!r} split {split!r} has no "
                                    f"language {lang!r} (found: {', '.join(rows[0])})")
            src_lang, tgt_lang = self.langs  # a missing text (None) counts as empty
            yield [row[src_lang] or "" for row in rows], [row[tgt_lang] or "" for row in rows]

    def where(self, split: str, index: int) -> str:
        return f"row {index} of split {split!r} of hub dataset {self.name!r}"


def open_corpus(cfg: DataConfig, splits: Sequence[str]) -> FileCorpus | HubCorpus:
    """The corpus ``cfg.source`` names; file corpora are checked for ``splits`` here."""
    if cfg.source == "hub":
        return HubCorpus(cfg)
    if cfg.source == "multi30k":
        corpus = FileCorpus(_multi30k_root(cfg, splits), MULTI30K_PATTERN, cfg.src_lang,
                            cfg.tgt_lang)
    elif cfg.source == "parallel_files":
        if not cfg.root or not Path(cfg.root).is_dir():
            raise DataError(f"data.root={cfg.root} is not a directory: point it at the folder "
                            f"of the {cfg.file_pattern}[.gz] files")
        corpus = FileCorpus(Path(cfg.root), cfg.file_pattern, cfg.src_lang, cfg.tgt_lang)
    else:
        raise DataError(f"data.source={cfg.source!r} is not one of {list(SOURCES)}")
    corpus.check(splits)
    return corpus


def _multi30k_root(cfg: DataConfig, splits: Sequence[str]) -> Path:
    """``cfg.root`` or ``$MULTI30K_DIR`` if it exists, else a download into the cache."""
    root = cfg.root or os.environ.get("MULTI30K_DIR")
    if root and Path(root).is_dir():
        return Path(root)
    missing = f"{root} does not exist" if root else "data.root and MULTI30K_DIR are not set"
    advice = "set MULTI30K_DIR or data.root to the folder of the {split}.{lang}.gz files"
    if not cfg.download:
        raise DataError(f"Multi30k not found: {missing} and data.download=false; {advice}")
    target = Path(cfg.cache_dir) / "multi30k"
    for file in (f"{split}.{lang}.gz" for split in splits for lang in (cfg.src_lang,
                                                                       cfg.tgt_lang)):
        if not (target / file).exists():
            url = MULTI30K_URL.format(file=file)
            try:
                download(url, target / file)
            except OSError as error:  # URLError and HTTPError are OSErrors
                raise DataError(f"Multi30k not found: {missing}, and downloading {url} failed "
                                f"({error}); {advice}") from None
    return target


def download(url: str, path: Path) -> None:
    """Fetch ``url`` to ``path`` through a temporary file, so a broken transfer leaves none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
        shutil.copyfileobj(response, out)
    os.replace(partial, path)


# ----------------------------------------------------------------------------- storage

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
    """Appends rows to ``path.bin`` as they come, so a streamed split never sits in memory."""

    def __init__(self, path: Path, text: bool = False) -> None:
        self.path, self.text = path, text
        self._file = open(path.with_suffix(".bin"), "wb")  # noqa: SIM115 -- closed in close()
        self._lengths: list[int] = []

    def add(self, rows: Sequence[str] | Sequence[list[int]]) -> None:
        if self.text:
            encoded = [row.encode("utf-8") for row in rows]
            lengths, flat = [len(row) for row in encoded], b"".join(encoded)
        else:
            lengths = [len(row) for row in rows]
            flat = np.fromiter(chain.from_iterable(rows), np.int32, sum(lengths)).tobytes()
        self._file.write(flat)
        self._lengths += lengths

    def close(self) -> None:
        self._file.close()
        offsets = np.concatenate([[0], np.cumsum(self._lengths, dtype=np.int64)])
        np.save(self.path.with_suffix(".idx.npy"), offsets.astype(np.int64))


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


# ----------------------------------------------------------------------------- preparing

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
    corpus = open_corpus(cfg, names)
    tokenizer_key = _hash(CACHE_VERSION, tokenizers.__version__, corpus.key(cfg.train_split),
                          cfg.src_lang, cfg.tgt_lang, cfg.vocab_size, cfg.joint_vocab,
                          cfg.lowercase)
    cache = Path(cfg.cache_dir) / f"{cfg.source}-{cfg.src_lang}-{cfg.tgt_lang}-{tokenizer_key}"
    if given_tokenizers is None:
        tokenizer_pair = _tokenizers(cfg, corpus, cache, log)
    else:
        tokenizer_pair, given_hash = given_tokenizers, tokenizer_hash(given_tokenizers)
        # A resumed run gives the tokenizer that its first start trained: then that start's
        # cache is reused. Any other tokenizer gets a folder keyed by its content.
        if _cached_tokenizers_hash(cfg, cache) != given_hash:
            given_key = _hash(CACHE_VERSION, "given", given_hash)
            cache = cache.with_name(f"{cfg.source}-{cfg.src_lang}-{cfg.tgt_lang}-{given_key}")
    encoded = {name: _encoded_split(cfg, corpus, name, tokenizer_pair, cache, log)
               for name in names}
    return TranslationData(*tokenizer_pair, encoded, cache)


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


def _tokenizers(cfg: DataConfig, corpus: FileCorpus | HubCorpus, cache: Path,
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
            texts = (text for chunk in corpus.chunks(cfg.train_split) for i in side
                     for text in chunk[i])
            tokenizer = Tokenizer.train(texts, cfg.vocab_size, cfg.lowercase)
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


def _encoded_split(cfg: DataConfig, corpus: FileCorpus | HubCorpus, split: str,
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
    corpus: FileCorpus | HubCorpus
    split: str
    tokenizer_pair: tuple[Tokenizer, Tokenizer]
    stats: SplitStats = field(init=False)

    def __post_init__(self) -> None:
        self.stats = SplitStats(self.split)

    def encode(self, src_texts: list[str], tgt_texts: list[str], offset: int) -> list[list]:
        """The kept [src_ids, tgt_ids, src_text, tgt_text] of a chunk whose first pair is
        pair ``offset`` of the split: empty pairs dropped, over-long ones handled."""
        self.stats.read += len(src_texts)
        indices = [i for i, (src, tgt) in enumerate(zip(src_texts, tgt_texts, strict=True))
                   if src.strip() and tgt.strip()]
        self.stats.dropped["empty"] += len(src_texts) - len(indices)
        texts = [[src_texts[i] for i in indices], [tgt_texts[i] for i in indices]]
        ids = [tokenizer.encode_batch(side)
               for tokenizer, side in zip(self.tokenizer_pair, texts, strict=True)]
        columns = self._limit_length(ids + texts, [offset + i for i in indices])
        self.stats.kept += len(columns[0])
        self.stats.src_tokens += sum(map(len, columns[0]))
        self.stats.tgt_tokens += sum(map(len, columns[1]))
        return columns

    def _limit_length(self, columns: list[list], indices: list[int]) -> list[list]:
        """Pairs over ``max_len`` tokens: dropped from train, truncated in val/test when
        ``allow_long_eval``, an error otherwise (a test set must not shrink silently)."""
        max_len, (src_ids, tgt_ids) = self.cfg.max_len, columns[:2]
        too_long = [j for j, (src, tgt) in enumerate(zip(src_ids, tgt_ids, strict=True))
                    if max(len(src), len(tgt)) > max_len]
        if not too_long:
            return columns
        if self.split == self.cfg.train_split:
            self.stats.dropped["too_long"] += len(too_long)
            drop = set(too_long)
            return [[row for j, row in enumerate(column) if j not in drop] for column in columns]
        if self.cfg.allow_long_eval:
            self.stats.truncated += len(too_long)
            return [[ids[:max_len] for ids in src_ids], [ids[:max_len] for ids in tgt_ids],
                    *columns[2:]]
        j = too_long[0]
        raise DataError(f"{self.corpus.where(self.split, indices[j])}: {len(src_ids[j])} "
                        f"source / {len(tgt_ids[j])} target tokens, more than data.max_len="
                        f"{max_len}; set data.allow_long_eval=true to keep such "
                        f"{self.split} pairs truncated")


# ----------------------------------------------------------------------------- batches

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
        order = order[np.lexsort((src_lengths[order], tgt_lengths[order], widths[order]))]
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


def _fill_batches(order: np.ndarray, widths: np.ndarray, max_tokens: int,
                  max_sentences: int | None) -> list[np.ndarray]:
    """Cut the length-sorted ``order`` greedily into batches: a pair joins the open batch
    while (pairs x widest pair) stays within max_tokens and pairs within max_sentences."""
    max_sentences = max_sentences or len(order) or 1
    batches, first, widest = [], 0, 0
    for position, width in enumerate(widths[order].tolist()):
        widest = max(widest, width)
        size = position - first + 1
        if size * widest > max_tokens or size > max_sentences:
            batches.append(order[first:position])
            first, widest = position, width
    if first < len(order):
        batches.append(order[first:])
    return batches


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
        move = {name: (getattr(self, name).pin_memory() if pin else getattr(self, name))
                .to(device, non_blocking=non_blocking)
                for name in ("src_tokens", "tgt_input", "tgt_output")}
        return Batch(**move, indices=self.indices, n_src_tokens=self.n_src_tokens,
                     n_tgt_tokens=self.n_tgt_tokens)


def collate(split: EncodedSplit, indices: Sequence[int], pad_id: int = PAD_ID) -> Batch:
    """Pairs ``indices`` of ``split`` as one Batch, padded to its longest sentence."""
    src_rows = [split.src_ids.row(i) for i in indices]
    tgt_rows = [split.tgt_ids.row(i) for i in indices]
    return Batch(src_tokens=_pad(src_rows, pad_id, bos=False),
                 tgt_input=_pad(tgt_rows, pad_id, bos=True),
                 tgt_output=_pad(tgt_rows, pad_id, bos=False),
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
