"""The shortcuts of ``transformer/data/words.py`` against the tokenizer itself, the reference:
Python normalization against the tokenizer's normalizer, character by character; word-by-word
ids against sentence-by-sentence encoding; BPE learned from piece counts against BPE
learned from the texts (the whole serialized tokenizer, byte for byte)."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import models, normalizers, pre_tokenizers

from transformer.data.words import (
    FlatEncoder,
    WordEncoder,
    count_pieces,
    flat_encoder,
    normalize,
)
from transformer.tokenizer import Tokenizer, _normalizer

WORDS = ["Mann", "läuft", "über's", "Feld", "dog", "ＡＢＣ", "ﬁsh", "„German“", "3,14", "--",
         "Σίσυφος", "ΣΑΣ", "İstanbul", "ǅungla", "ſtraße", "µm", "½", "e\u0301", "😀", "日本語"]
TRICKY = [
    "", " ", "  leading and trailing  ", "tabs\tand\r\nnewlines\x0band\x0cfeeds\x85nel",
    "non-breaking\u00a0space, em\u2003space, ideographic\u3000space",
    "file\x1cgroup\x1drecord\x1eunit\x1fseparators", "a </s> b<s>c<pad>d <unk>", "<BT> tagged",
    "full-width ＜/s＞ made by NFKC", "\u00b4acute \u00a8diaeresis \u00b8cedilla at the start",
    "ABC ÀÉÎ ÕÜ Ǆ ǅ Ĳ", "\u0301combining first", "<BT>", "<BT>  ", "<BT>glued", "<BT> <BT> two",
    "<BT></s>", "<s>start", " <BT> not first", "<BT> „quoted“", "<BT> ＡＢＣ",
]


def sentences(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    spaces = [" ", " ", " ", "  ", "\t", "\u00a0"]
    return [rng.choice(spaces).join(rng.choices(WORDS, k=rng.randint(1, 8))) for _ in
            range(count)] + TRICKY


@pytest.mark.parametrize("lowercase", [False, True])
def test_python_normalization_is_the_tokenizers_below_u0300(lowercase):
    reference = _normalizer(lowercase)
    rng = random.Random(1)
    characters = [chr(code) for code in range(0x300) if chr(code) not in "\x1c\x1d\x1e\x1f"]
    texts = [text for c in characters for text in (c, f"a{c}b", f"{c} x", f"x {c}{c}", f"A{c}")]
    texts += ["".join(rng.choices(characters, k=12)) for _ in range(3000)]
    for text in texts:
        assert normalize(text, lowercase) == reference.normalize_str(text), repr(text)
    assert normalize("“quoted”", lowercase) is None  # beyond U+0300: left to the tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(sentences(2000, seed=1), vocab_size=400, tags=["<BT>"])


@pytest.mark.parametrize("cache_size", [5, 1 << 20])
def test_word_by_word_ids_equal_sentence_by_sentence(tokenizer, cache_size):
    encoder = WordEncoder(tokenizer, tokenizer._tokenizer, lowercase=False,
                          cache_size=cache_size)  # 5: most words leave the cache again
    texts = sentences(3000)
    reference = [tokenizer.encode(text) for text in texts]
    for start in range(0, len(texts), 700):  # chunks: the cache carries over
        ids, lengths = encoder(texts[start:start + 700])
        assert lengths.tolist() == [len(row) for row in reference[start:start + 700]]
        assert ids.tolist() == [i for row in reference[start:start + 700] for i in row]
    assert len(encoder.index) <= cache_size
    assert encoder([])[1].shape == (0,)


# any text: letters below U+0300 mostly (Python's path), any character now and then
TEXT = st.lists(st.one_of(st.characters(max_codepoint=0x2ff), st.sampled_from(" \t\n\r\x1c"),
                          st.characters(exclude_categories=["Cs"]),  # no lone surrogates
                          st.sampled_from(["</s>", "<BT>", "ſ", "„"])),
                max_size=30).map("".join)


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(TEXT, max_size=8), lowercase=st.booleans())
def test_any_text_is_encoded_as_by_the_tokenizer(tokenizer, texts, lowercase):
    encoder = WordEncoder(tokenizer, tokenizer._tokenizer, lowercase=False)
    ids, lengths = encoder(texts)
    reference = [tokenizer.encode(text) for text in texts]
    assert lengths.tolist() == [len(row) for row in reference]
    assert ids.tolist() == [i for row in reference for i in row]
    pieces = count_pieces(iter(texts), lowercase)  # as BPE training would count them
    normalizer = _normalizer(lowercase)
    expected = Counter(piece for text in texts for piece, _ in
                       tokenizer._tokenizer.pre_tokenizer.pre_tokenize_str(
                           normalizer.normalize_str(text)))
    assert pieces == expected


def test_lowercasing_tokenizer_is_encoded_word_by_word_too():
    lowercasing = Tokenizer.train(sentences(500, seed=2), vocab_size=350, lowercase=True)
    encoder = flat_encoder(lowercasing)
    assert isinstance(encoder, WordEncoder) and encoder.lowercase
    texts = sentences(500, seed=3)
    ids, _ = encoder(texts)
    assert ids.tolist() == [i for text in texts for i in lowercasing.encode(text)]


def test_other_pipelines_are_encoded_sentence_by_sentence(tokenizer):
    spec = json.loads(tokenizer.to_str())
    spec["model"]["dropout"] = 0.1  # random merges: a word has no one encoding
    dropout = Tokenizer.from_str(json.dumps(spec))
    whitespace = tokenizers.Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2,
                                                        "<unk>": 3, "a": 4}, "<unk>"))
    whitespace.normalizer = normalizers.NFKC()
    whitespace.pre_tokenizer = pre_tokenizers.Whitespace()
    for other in (dropout, Tokenizer(whitespace)):
        assert type(flat_encoder(other)) is FlatEncoder
    ids, lengths = flat_encoder(Tokenizer(whitespace))(["a b a", "", "a"])
    assert ids.tolist() == [4, 3, 4, 4] and lengths.tolist() == [3, 0, 1]
    assert ids.dtype == np.int32 and lengths.dtype == np.int64


@pytest.mark.parametrize(("lowercase", "tags"), [(False, ()), (True, ("<BT>",))])
def test_bpe_from_piece_counts_is_bpe_from_the_texts(lowercase, tags):
    texts = sentences(3000, seed=4)
    from_texts = Tokenizer.train(texts, 500, lowercase, tags)
    from_counts = Tokenizer.train_from_counts(count_pieces(iter(texts), lowercase), 500,
                                              lowercase, tags)
    assert from_counts.to_str() == from_texts.to_str()
