"""Several training corpora in one run (``data.extra_train``): real data beside
back-translated or distilled data, each corpus repeated ``weight`` times an epoch and, if
it has a ``tag``, each of its source sentences prefixed with that tag (``<BT> ...``), so
that the model can tell synthetic sources from real ones (Caswell et al. 2019).

The mix is the train split of a ``MixedCorpus``: the main corpus, then each extra corpus
``weight`` times. Everything downstream (BPE, encoding, the cache, the sampler, resume)
sees one split; the cache key holds every corpus's files, weight and tag. The tokenizer
learns each corpus once (not weighted) and keeps each tag as one token of its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformer.config import DataConfig, ExtraCorpusConfig
from transformer.data.corpora import FileCorpus, HubCorpus
from transformer.data.text import DataError


@dataclass
class _Part:
    """One corpus of the mix: where its train pairs come from, how often, with which tag."""

    corpus: FileCorpus | HubCorpus
    split: str
    weight: int = 1
    tag: str | None = None


class MixedCorpus:
    """``main`` with ``extras`` mixed into its ``train_split``; other splits are main's."""

    def __init__(self, main: FileCorpus | HubCorpus, train_split: str,
                 extras: Sequence[ExtraCorpusConfig], src_lang: str, tgt_lang: str) -> None:
        self.main, self.train_split = main, train_split
        self.parts = [_Part(main, train_split)]
        for index, extra in enumerate(extras):
            key = f"data.extra_train[{index}]"
            if not extra.root or not Path(extra.root).is_dir():
                raise DataError(f"{key}.root={extra.root} is not a directory: point it at "
                                f"the folder of its {extra.file_pattern}[.gz] files")
            if extra.weight < 1:
                raise DataError(f"{key}.weight={extra.weight}: the copies of the corpus in "
                                "an epoch, a whole number of at least 1")
            if extra.tag is not None and (not extra.tag.strip() or " " in extra.tag):
                raise DataError(f"{key}.tag={extra.tag!r}: one token without spaces, "
                                "e.g. '<BT>'")
            corpus = FileCorpus(Path(extra.root), extra.file_pattern, src_lang, tgt_lang)
            corpus.check([extra.split])
            self.parts.append(_Part(corpus, extra.split, extra.weight, extra.tag))
        self._ranges: list[tuple[int, _Part]] = []  # (first index, part) of the train split

    @property
    def tags(self) -> list[str]:
        """The tags of the mix, each once, in order: tokens the tokenizer keeps whole."""
        return list(dict.fromkeys(part.tag for part in self.parts if part.tag))

    @property
    def splits(self) -> list[str]:
        return self.main.splits

    def check(self, splits: Sequence[str]) -> None:
        self.main.check(splits)

    def key(self, split: str) -> list[Any]:
        if split != self.train_split:
            return self.main.key(split)
        return [[part.corpus.key(part.split), part.weight, part.tag] for part in self.parts]

    def chunks(self, split: str, weighted: bool = True
               ) -> Iterator[tuple[list[str], list[str]]]:
        """The split's pairs in chunks; the train split as the mix: each corpus ``weight``
        times (once if not ``weighted``), its sources tagged."""
        if split != self.train_split:
            yield from self.main.chunks(split)
            return
        self._ranges, start = [], 0
        for part in self.parts:
            for _ in range(part.weight if weighted else 1):
                self._ranges.append((start, part))
                for src_texts, tgt_texts in part.corpus.chunks(part.split):
                    if part.tag:
                        src_texts = [f"{part.tag} {text}" for text in src_texts]
                    start += len(src_texts)
                    yield src_texts, tgt_texts

    def where(self, split: str, index: int) -> str:
        if split != self.train_split or not self._ranges:
            return self.main.where(split, index)
        start, part = next((start, part) for start, part in reversed(self._ranges)
                           if start <= index)
        return part.corpus.where(part.split, index - start)


def mix(corpus: FileCorpus | HubCorpus, cfg: DataConfig) -> FileCorpus | HubCorpus | MixedCorpus:
    """``corpus`` with ``cfg.extra_train`` mixed into its train split, if any are given."""
    if not cfg.extra_train:
        return corpus
    return MixedCorpus(corpus, cfg.train_split, cfg.extra_train, cfg.src_lang, cfg.tgt_lang)
