"""Where the pairs come from: parallel text files (Multi30k, ``parallel_files``) or a
Hugging Face dataset (``hub``), each read one split at a time, in chunks."""

from __future__ import annotations

import os
import re
import shutil
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from transformer.config import DataConfig
from transformer.data.text import DataError, iter_parallel_chunks

SOURCES = ("multi30k", "parallel_files", "hub")
MULTI30K_URL = "https://github.com/multi30k/dataset/raw/master/data/task1/raw/{file}"
MULTI30K_PATTERN = "{split}.{lang}"
CHUNK_PAIRS = 50_000  # pairs read and encoded at once: what a streamed corpus holds in memory


class FileCorpus:
    """Parallel text files ``root / pattern.format(split=..., lang=...)``, plain or .gz;
    line i of the source file translates line i of the target file. Read in chunks each
    time a split is asked for (the train split twice: BPE sample, then ids), never whole.

    ``tgt_files`` gives some splits another target file, line i translating line i of the
    split's source file: ``data.train_tgt_file``, a teacher's translations of the train
    source (sequence-level knowledge distillation, Kim and Rush 2016). Its path, size and
    modification time are then the split's cache key, as any corpus file's are."""

    def __init__(self, root: Path, pattern: str, src_lang: str, tgt_lang: str,
                 tgt_files: dict[str, Path] | None = None) -> None:
        self.root, self.pattern, self.langs = root, pattern, (src_lang, tgt_lang)
        self.tgt_files = tgt_files or {}

    @cached_property
    def splits(self) -> list[str]:
        """The splits that have a file for both languages (or a source file and one of
        ``tgt_files``)."""
        found = [set(self._splits_of(lang)) for lang in self.langs]
        return sorted(found[0] & (found[1] | set(self.tgt_files)))

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
        src_path, tgt_path = (p if p.exists() else p.with_name(p.name + ".gz") for p in plain)
        return src_path, self.tgt_files.get(split, tgt_path)

    def key(self, split: str) -> list[Any]:
        """What identifies the split's content for the cache: paths, sizes, mtimes."""
        return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns]
                for p in self.paths(split)]

    def chunks(self, split: str) -> Iterator[tuple[list[str], list[str]]]:
        yield from iter_parallel_chunks(*self.paths(split), CHUNK_PAIRS)

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
    """The corpus ``cfg.source`` names; file corpora are checked for ``splits`` here.
    With ``cfg.pairs``, a ``MultilingualCorpus`` of those directions."""
    if cfg.pairs:
        from transformer.data.multilingual import open_multilingual

        return open_multilingual(cfg, splits, _file_corpus)
    if cfg.source == "hub":
        if cfg.train_tgt_file:
            raise DataError("data.train_tgt_file replaces the target side of a file corpus "
                            "(data=multi30k or data=parallel_files), not of data=hub")
        return HubCorpus(cfg)
    corpus = _file_corpus(cfg, splits)
    corpus.check(splits)
    return corpus


def _file_corpus(cfg: DataConfig, splits: Sequence[str]) -> FileCorpus:
    """The files of ``cfg``'s direction (Multi30k's or ``data.file_pattern``), not checked."""
    pattern = MULTI30K_PATTERN if cfg.source == "multi30k" else cfg.file_pattern
    return FileCorpus(_files_root(cfg, splits), pattern, cfg.src_lang, cfg.tgt_lang,
                      _tgt_files(cfg, splits))


def _files_root(cfg: DataConfig, splits: Sequence[str]) -> Path:
    """The folder of a file corpus's files (Multi30k's downloaded if need be)."""
    if cfg.source == "multi30k":
        return _multi30k_root(cfg, splits)
    if cfg.source == "parallel_files":
        if not cfg.root or not Path(cfg.root).is_dir():
            raise DataError(f"data.root={cfg.root} is not a directory: point it at the folder "
                            f"of the {cfg.file_pattern}[.gz] files")
        return Path(cfg.root)
    raise DataError(f"data.source={cfg.source!r} is not one of {list(SOURCES)}")


def _tgt_files(cfg: DataConfig, splits: Sequence[str]) -> dict[str, Path]:
    """``{train_split: data.train_tgt_file}`` when that is set; it must exist when the train
    split is among ``splits`` (evaluating a distilled student reads val/test only: by then
    the teacher's file may be gone)."""
    if not cfg.train_tgt_file:
        return {}
    path = Path(cfg.train_tgt_file)
    if cfg.train_split in splits and not path.is_file():
        raise DataError(f"data.train_tgt_file={path}: no such file; translate the train source "
                        "into it first (README \"Distillation\")")
    return {cfg.train_split: path}


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
