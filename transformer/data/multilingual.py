"""One model for several directions (``data.pairs=[en-de,en-fr,en-cs]``), as Johnson et al.
(2017): every source sentence starts with a tag naming the language to translate into
(``<2de> A man is riding a bike.``), the vocabulary is one BPE for all languages, and each
split is the directions' files one after another.

A split that only some directions have (Multi30k's test_2017_flickr has no Czech) is the
directions that have it. The tag is the first source token of every pair, a token of its
own in the tokenizer: validation groups its sentences by it (``direction_indices``) to
score each direction apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from transformer.config import PAIR, DataConfig
from transformer.data.corpora import FileCorpus
from transformer.data.text import DataError


def parse_pairs(pairs: Sequence[str]) -> list[tuple[str, str]]:
    """``["en-de", ...]`` -> ``[("en", "de"), ...]`` (checked by config.check_pairs)."""
    return [PAIR.fullmatch(str(pair)).groups() for pair in pairs]  # type: ignore[union-attr]


def language_tag(tgt_lang: str) -> str:
    """The source tag asking for ``tgt_lang``: ``<2de>``."""
    return f"<2{tgt_lang}>"


def tag_sources(texts: Iterable[str], tag: str) -> list[str]:
    """``texts`` with ``tag`` before each; an empty line stays empty (nothing to translate)."""
    return [f"{tag} {text}" if text.strip() else text for text in texts]


def directions_name(cfg: DataConfig, arrow: bool = False) -> str:
    """``en-de`` (``en -> de`` with ``arrow``), or ``en-de+en-fr+en-cs`` for a multilingual
    config: what its cache folders and messages call it."""
    pairs = getattr(cfg, "pairs", None)  # a checkpoint from before data.pairs has none
    if pairs:
        return "+".join(pairs)
    return f"{cfg.src_lang}{' -> ' if arrow else '-'}{cfg.tgt_lang}"


class MultilingualCorpus:
    """The corpora of ``pairs`` (``(src, tgt)``, each a ``FileCorpus``), read as one:
    split by split, direction after direction, each source tagged with its target."""

    def __init__(self, corpora: dict[tuple[str, str], FileCorpus]) -> None:
        self.corpora = corpora
        self._starts: list[tuple[int, tuple[str, str]]] = []  # (first index, direction)

    @property
    def tags(self) -> list[str]:
        """Each target language's tag once: tokens the tokenizer keeps whole."""
        return list(dict.fromkeys(language_tag(tgt) for _, tgt in self.corpora))

    @property
    def splits(self) -> list[str]:
        """The splits that at least one direction has."""
        return sorted({split for corpus in self.corpora.values() for split in corpus.splits})

    def directions(self, split: str) -> list[tuple[str, str]]:
        return [pair for pair, corpus in self.corpora.items() if split in corpus.splits]

    def check(self, splits: Iterable[str]) -> None:
        for split in splits:
            if not self.directions(split):
                where = "; ".join(f"{src}-{tgt}: {corpus.root / corpus.pattern}"
                                  for (src, tgt), corpus in self.corpora.items())
                raise DataError(f"split {split!r} not found for any of the directions "
                                f"({where}); splits found: {', '.join(self.splits) or 'none'}")

    def key(self, split: str) -> list[Any]:
        return [[f"{src}-{tgt}", self.corpora[src, tgt].key(split)]
                for src, tgt in self.directions(split)]

    def chunks(self, split: str) -> Iterator[tuple[list[str], list[str]]]:
        self.check([split])
        self._starts, start = [], 0
        for pair in self.directions(split):
            self._starts.append((start, pair))
            for src_texts, tgt_texts in self.corpora[pair].chunks(split):
                start += len(src_texts)
                yield tag_sources(src_texts, language_tag(pair[1])), tgt_texts

    def where(self, split: str, index: int) -> str:
        """The file line of pair ``index`` of the split, as the last ``chunks`` read it."""
        start, pair = next((start, pair) for start, pair in reversed(self._starts)
                           if start <= index)
        return self.corpora[pair].where(split, index - start)


def open_multilingual(cfg: DataConfig, splits: Sequence[str], file_corpus
                      ) -> MultilingualCorpus:
    """The ``MultilingualCorpus`` of ``cfg.pairs``; ``file_corpus(pair_cfg, splits)`` opens
    one direction's files (found, or downloaded for Multi30k), as for one direction."""
    corpora = {(src, tgt): file_corpus(replace(cfg, src_lang=src, tgt_lang=tgt, pairs=[]),
                                       splits)
               for src, tgt in parse_pairs(cfg.pairs)}
    corpus = MultilingualCorpus(corpora)
    corpus.check(splits)
    return corpus


def direction_indices(first_src_ids: Sequence[int], tag_ids: dict[str, int]
                      ) -> dict[str, list[int]]:
    """The indices of a split's pairs per direction name (``en-fr``), found by the tag each
    source starts with; ``tag_ids`` maps direction names to their tag's id."""
    by_tag = {tag_id: name for name, tag_id in tag_ids.items()}
    groups: dict[str, list[int]] = {name: [] for name in tag_ids}
    for index, first in enumerate(first_src_ids):
        if first in by_tag:
            groups[by_tag[first]].append(index)
    return groups


def tag_ids(pairs: Sequence[str], src_tokenizer: Any) -> dict[str, int]:
    """Direction name -> the id of its tag in ``src_tokenizer``; a tag the tokenizer lacks
    (a tokenizer from a file without it) is an error naming it."""
    ids = {}
    for pair, (_, tgt) in zip(pairs, parse_pairs(pairs), strict=True):
        tag_id = src_tokenizer.token_to_id(language_tag(tgt))
        if tag_id is None:
            raise DataError(f"the source tokenizer has no token {language_tag(tgt)} for "
                            f"data.pairs entry {pair}: add it to your tokenizer file, or let "
                            "the run learn BPE")
        ids[pair] = tag_id
    return ids


def target_tag(data: Any, tgt_lang: str | None, every_direction: bool = False) -> str | None:
    """The tag to put before each source when translating with a model trained on ``data``
    (its training config's data) into ``tgt_lang``: None for a one-direction model (whose
    target ``tgt_lang`` may only repeat), and for a multilingual one asked for
    ``every_direction`` (scoring each of its directions with its own tag)."""
    pairs = list(getattr(data, "pairs", None) or [])
    if not pairs:
        if tgt_lang is not None and tgt_lang != data.tgt_lang:
            raise DataError(f"tgt_lang={tgt_lang}: the model translates {data.src_lang} -> "
                            f"{data.tgt_lang} only")
        return None
    targets = [tgt for _, tgt in parse_pairs(pairs)]
    if tgt_lang is None:
        if every_direction:
            return None
        raise DataError(f"the model translates into {', '.join(targets)} (data.pairs="
                        f"{pairs}): set tgt_lang to one of them")
    if tgt_lang not in targets:
        raise DataError(f"tgt_lang={tgt_lang} is not a language the model translates into "
                        f"({', '.join(targets)})")
    return language_tag(tgt_lang)
