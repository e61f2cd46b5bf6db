"""Byte-level BPE subwords (Sennrich et al., 2016; section 5.1 of the paper) with fixed
special-token ids, on top of Hugging Face ``tokenizers``.

Text -> ids goes through three stages:

1. normalization: Unicode NFKC (``ﬁ`` -> ``fi``, full-width forms -> ASCII), optional
   lowercasing, every run of whitespace (tabs, ``\\r``, double spaces) -> one space, and no
   leading or trailing whitespace. ``Tokenizer.normalize`` applies exactly this.
2. byte-level pre-tokenization (GPT-2's): words are split off and written as bytes, so every
   string has an encoding and ``<unk>`` never appears; a space is put before the first word
   so a word gets the same subwords at the start of a sentence and inside it.
3. BPE merges learned on the training split.

The byte-level decoder inverts 2 and 3 exactly, so ``decode(encode(x)) == normalize(x)``:
the decoded text is detokenized, ready for sacreBLEU. Ids follow fairseq's convention of
no specials from ``encode``; the data pipeline adds ``<s>``/``</s>`` where needed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from itertools import islice, repeat
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # in id order: the trainer adds them first


class Tokenizer:
    """A BPE tokenizer with ``<pad>``=0, ``<s>``=1, ``</s>``=2, ``<unk>``=3."""

    pad_id, bos_id, eos_id, unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(token) != expected_id:
                raise ValueError(f"tokenizer has {token!r} at id {tokenizer.token_to_id(token)}, "
                                 f"expected {expected_id}")
        self._tokenizer = tokenizer

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, lowercase: bool = False,
              tags: Sequence[str] = ()) -> Tokenizer:
        """Learn BPE merges on ``texts`` until the vocabulary (specials and the 256 byte
        symbols included) holds ``vocab_size`` tokens, or fewer if the text runs out.
        ``tags`` (``<BT>``, ...) become tokens of their own after the specials: found whole
        in a text, never split (``data.extra_train``)."""
        tokenizer = _pipeline(tokenizers.Tokenizer(models.BPE(unk_token="<unk>")), lowercase)
        trainer = _trainer(vocab_size, tags)
        tokenizer.train_from_iterator(_chunks(texts, 1000), trainer)  # lists: fewer hand-offs
        return cls(tokenizer)

    @classmethod
    def train_from_counts(cls, piece_counts: Mapping[str, int], vocab_size: int,
                          lowercase: bool = False, tags: Sequence[str] = ()) -> Tokenizer:
        """The tokenizer ``train`` learns from texts whose byte-level pieces (``"Ġdog"``,
        what the pre-tokenizer splits a normalized text into) occur ``piece_counts`` times
        (``transformer.data.words.count_pieces``): BPE learns from these counts alone, so
        the result is the same, and counting words in Python is faster than pre-tokenizing
        every sentence."""
        tokenizer = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
        # Byte-level pieces never hold a space (it is "Ġ"): split there, count, no more.
        tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="removed")
        tokenizer.train_from_iterator(_repeated(piece_counts), _trainer(vocab_size, tags))
        return cls(_pipeline(tokenizer, lowercase))

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def normalize(self, text: str) -> str:
        """The text as the tokenizer sees it, and as ``decode(encode(text))`` returns it."""
        return self._tokenizer.normalizer.normalize_str(text)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once in Rust, on all cores."""
        encodings = self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Sequence[int] | Any) -> str:
        """Detokenized text of ``ids`` (a list or a 1-d tensor): special tokens are dropped
        and whatever follows the first ``</s>`` is ignored."""
        return self._tokenizer.decode(_until_eos(ids), skip_special_tokens=True).strip()

    def decode_batch(self, batch: Iterable[Sequence[int]]) -> list[str]:
        texts = self._tokenizer.decode_batch([_until_eos(ids) for ids in batch],
                                             skip_special_tokens=True)
        return [text.strip() for text in texts]

    def token_to_id(self, token: str) -> int | None:
        """The id of ``token`` (``<BT>``, ``<s>``, a BPE piece), None if it is not one."""
        return self._tokenizer.token_to_id(token)

    def tokens(self, text: str) -> list[str]:
        """The subwords of ``text`` as readable strings (``▁`` marks a word start), e.g. for
        the axes of an attention map."""
        return self.id_tokens(self.encode(text))

    def id_tokens(self, ids: Sequence[int] | Any) -> list[str]:
        """Readable strings for ``ids``, special tokens included (``<s>``, ``</s>``, ...)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        return [self._readable[i] for i in ids]

    @cached_property
    def _readable(self) -> list[str]:
        # Byte-level tokens spell bytes as odd characters ("Ġ" is a space): decode each one,
        # and keep the raw form for the pieces of a multi-byte character that decode to "�".
        decoder, readable = decoders.ByteLevel(), []
        for i in range(self.vocab_size):
            token = self._tokenizer.id_to_token(i)
            text = token if i < len(SPECIAL_TOKENS) else decoder.decode([token])
            readable.append(token if "\ufffd" in text else text.replace(" ", "▁"))
        return readable

    def to_str(self) -> str:
        """The whole tokenizer as JSON (merges, normalizer, ...), e.g. to store in checkpoints."""
        return self._tokenizer.to_str()

    @classmethod
    def from_str(cls, json: str) -> Tokenizer:
        return cls(tokenizers.Tokenizer.from_str(json))

    def save(self, path: str | Path) -> None:
        self._tokenizer.save(str(path))

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        return cls(tokenizers.Tokenizer.from_file(str(path)))


def _pipeline(tokenizer: tokenizers.Tokenizer, lowercase: bool) -> tokenizers.Tokenizer:
    """``tokenizer`` with the normalizer, byte-level pre-tokenizer and decoder of the
    module docstring."""
    tokenizer.normalizer = _normalizer(lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _trainer(vocab_size: int, tags: Sequence[str]) -> trainers.BpeTrainer:
    return trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[*SPECIAL_TOKENS, *tags], show_progress=False,
        # all 256 bytes from the start, so text unseen in training still encodes
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())


def _repeated(piece_counts: Mapping[str, int], most: int = 4096) -> Iterator[str]:
    """Each piece as often as counted, space-separated, in strings of at most ``most``."""
    for piece, count in piece_counts.items():
        whole, rest = divmod(count, most)
        yield from repeat((piece + " ") * most, whole)
        if rest:
            yield (piece + " ") * rest


def _normalizer(lowercase: bool) -> normalizers.Normalizer:
    steps = [normalizers.NFKC()]
    if lowercase:
        steps.append(normalizers.Lowercase())
    steps += [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    return normalizers.Sequence(steps)


def _until_eos(ids: Sequence[int] | Any) -> list[int]:
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    return ids[: ids.index(EOS_ID)] if EOS_ID in ids else ids


def _chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(texts)
    while chunk := list(islice(iterator, size)):
        yield chunk


class TokenizerPair:
    """Separate vocabularies (``data.joint_vocab=false``): encodes with the source side's
    tokenizer and decodes with the target side's, so ``translate`` takes either kind."""

    def __init__(self, src: Tokenizer, tgt: Tokenizer) -> None:
        self.src, self.tgt = src, tgt

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.src.encode_batch(texts)

    def decode_batch(self, batch: Iterable[Sequence[int]]) -> list[str]:
        return self.tgt.decode_batch(batch)
