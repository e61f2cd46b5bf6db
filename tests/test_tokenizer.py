"""The BPE tokenizer: fixed special ids, exact round trips after normalization, storage."""

from __future__ import annotations

import pytest
import torch

from transformer.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer

CORPUS = [
    "A man in a blue shirt is standing on a ladder.",
    "Ein Mann in einem blauen Hemd steht auf einer Leiter.",
    "Two young children are playing in the grass.",
    "Zwei kleine Kinder spielen im Gras.",
    "Un homme en chemise bleue est debout sur une échelle.",
    "Muž v modré košili stojí na žebříku.",
] * 20

TRICKY = [
    "Ein Mann läuft über's Feld!",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nnewlines\nand   runs of  spaces",
    "ligature ﬁsh, full-width ＡＢＣ, non-breaking\u00a0space",
    "unseen characters: 日本語, emoji 😀, Ωμέγα",
    "numbers 3,14 and 1.000.000; quotes \"double\" 'single' „German“",
    "",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(CORPUS, vocab_size=400)


def test_special_tokens_have_fixed_ids(tokenizer):
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2, 3)
    assert tokenizer.id_tokens([0, 1, 2, 3]) == ["<pad>", "<s>", "</s>", "<unk>"]


def test_vocab_size_is_at_most_the_requested_size(tokenizer):
    assert 260 < tokenizer.vocab_size <= 400  # 4 specials + 256 bytes + merges
    assert Tokenizer.train(CORPUS * 5, vocab_size=300).vocab_size == 300


@pytest.mark.parametrize("text", TRICKY + CORPUS[:6])
def test_decode_inverts_encode_up_to_normalization(tokenizer, text):
    ids = tokenizer.encode(text)
    assert UNK_ID not in ids  # byte-level: every character has an encoding
    assert tokenizer.decode(ids) == tokenizer.normalize(text)


def test_normalization_is_nfkc_and_collapsed_whitespace(tokenizer):
    assert tokenizer.normalize("  ﬁ\t ＡＢ\r\nc  ") == "fi AB c"
    lowercase = Tokenizer.train(CORPUS, vocab_size=300, lowercase=True)
    assert lowercase.decode(lowercase.encode("Ein MANN")) == "ein mann"


def test_encode_adds_no_specials_and_batch_matches_single(tokenizer):
    ids = tokenizer.encode(CORPUS[0])
    assert not {PAD_ID, BOS_ID, EOS_ID} & set(ids)
    assert tokenizer.encode_batch(TRICKY) == [tokenizer.encode(text) for text in TRICKY]
    assert tokenizer.encode("") == []


def test_decode_drops_specials_and_stops_at_the_first_eos(tokenizer):
    ids = tokenizer.encode("Two young children")
    tail = tokenizer.encode(" are playing")
    assert tokenizer.decode([BOS_ID, *ids, EOS_ID, *tail, PAD_ID]) == "Two young children"
    assert tokenizer.decode(torch.tensor([BOS_ID, *ids, EOS_ID, PAD_ID])) == "Two young children"
    assert tokenizer.decode_batch([[BOS_ID, *ids, EOS_ID, *tail], ids + tail, []]) == [
        "Two young children", "Two young children are playing", ""]


def test_tokens_are_readable_subwords(tokenizer):
    tokens = tokenizer.tokens("A man in a blue shirt")
    assert tokens[0] == "▁A"
    assert "".join(tokens).replace("▁", " ").strip() == "A man in a blue shirt"
    assert tokenizer.id_tokens(torch.tensor([BOS_ID, EOS_ID])) == ["<s>", "</s>"]


def test_saved_and_serialized_tokenizers_encode_the_same(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    for copy in (Tokenizer.from_file(path), Tokenizer.from_str(tokenizer.to_str())):
        assert copy.vocab_size == tokenizer.vocab_size
        assert copy.encode_batch(TRICKY) == tokenizer.encode_batch(TRICKY)
        assert copy.normalize(TRICKY[2]) == tokenizer.normalize(TRICKY[2])


def test_a_tokenizer_with_other_special_ids_is_refused(tokenizer):
    import tokenizers

    raw = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    swapped = raw.to_str().replace('"<pad>"', '"<tmp>"').replace('"<s>"', '"<pad>"')
    with pytest.raises(ValueError, match="'<pad>' at id 1, expected 0"):
        Tokenizer(tokenizers.Tokenizer.from_str(swapped))
