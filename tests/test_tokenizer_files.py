"""Your own tokenizer (``data.tokenizer=PATH``): SentencePiece models and Hugging Face
``tokenizer.json`` files split text into the same pieces as their own libraries do, with
their special tokens moved to our ids; training and checkpoints carry them; bad settings
fail in one line naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from tests.conftest import make_toy_pairs
from tests.test_train import compose_config
from transformer.checkpoint import read_checkpoint, read_tokenizers
from transformer.config import ConfigError, DataConfig
from transformer.tokenizer import SPECIAL_TOKENS
from transformer.tokenizer_files import load_tokenizer_file, tokenizers_from_config
from transformer.trainer import train

SRC, TGT = make_toy_pairs(300, seed=1)
TEXTS = SRC + TGT
PROBES = [*SRC[:40], "a sentence with words it never saw: Zürich, 1999!"]


def train_sentencepiece(folder: Path, model_type: str = "unigram", size: int = 60) -> Path:
    (folder / "text.txt").write_text("\n".join(TEXTS) + "\n")
    spm.SentencePieceTrainer.train(input=str(folder / "text.txt"),
                                   model_prefix=str(folder / model_type), vocab_size=size,
                                   model_type=model_type, hard_vocab_limit=False,
                                   minloglevel=2)
    return folder / f"{model_type}.model"


def train_wordpiece(folder: Path) -> Path:
    """A BERT-style tokenizer: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, then the word pieces."""
    tokenizer = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = tokenizers.decoders.WordPiece()
    tokenizer.train_from_iterator(TEXTS, trainers.WordPieceTrainer(
        vocab_size=120, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
        show_progress=False))
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def assert_specials_at_our_ids(tokenizer) -> None:
    assert [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS] == [0, 1, 2, 3]


def test_a_sentencepiece_model_splits_as_sentencepiece_does(tmp_path):
    path = train_sentencepiece(tmp_path)
    ours, theirs = load_tokenizer_file(path), spm.SentencePieceProcessor(model_file=str(path))
    assert_specials_at_our_ids(ours)
    assert ours.vocab_size == theirs.get_piece_size() + 1  # it has no <pad>: added
    for text in PROBES:
        pieces = [theirs.id_to_piece(i) for i in theirs.encode(text)]  # unknown: <unk>
        assert ours.id_tokens(ours.encode(text)) == pieces, text
        if "Zürich" not in text:  # <unk> decodes to nothing here, to " ⁇ " there
            assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text)), text
    # The ids differ only by the move of the specials: a bijection on the pieces.
    assert {ours.id_tokens([i])[0] for i in range(4, ours.vocab_size)} == {
        theirs.id_to_piece(i) for i in range(theirs.get_piece_size())} - set(SPECIAL_TOKENS)


def test_a_tokenizer_json_gets_its_specials_renamed_to_ours(tmp_path):
    path = train_wordpiece(tmp_path)
    ours, theirs = load_tokenizer_file(path), tokenizers.Tokenizer.from_file(str(path))
    assert_specials_at_our_ids(ours)
    assert ours.vocab_size == theirs.get_vocab_size()  # all four mapped, none added
    for text in PROBES:
        assert ours.id_tokens(ours.encode(text)) == [
            token.replace("[UNK]", "<unk>") for token in
            theirs.encode(text, add_special_tokens=False).tokens], text
    unseen = ours.encode("Zürich")
    assert 3 in unseen or all(i > 3 for i in unseen)  # <unk> is ours: id 3


def test_a_sentencepiece_bpe_model_is_refused_in_one_line(tmp_path):
    path = train_sentencepiece(tmp_path, "bpe")
    with pytest.raises(ConfigError, match=r"is a SentencePiece BPE model; .* unigram"):
        load_tokenizer_file(path)


@pytest.mark.parametrize(("settings", "message"), [
    (dict(tokenizer="/nope/sp.model"), r"data\.tokenizer=/nope/sp\.model: no such file"),
    (dict(tokenizer="SP", src_tokenizer="SP"), r"data\.tokenizer names one .*: set either"),
    (dict(src_tokenizer="SP", joint_vocab=False), r"data\.tgt_tokenizer is not set"),
    (dict(src_tokenizer="SP", tgt_tokenizer="SP"), r"set data\.joint_vocab=false"),
    (dict(tokenizer="SP", joint_vocab=False), r"set data\.joint_vocab=true"),
    (dict(tokenizer="TEXT"), r"data\.tokenizer=.*text\.txt: cannot read it as a tokenizer"),
])
def test_bad_settings_are_named(tmp_path, settings, message):
    path = train_sentencepiece(tmp_path)
    names = {"SP": str(path), "TEXT": str(tmp_path / "text.txt")}
    cfg = DataConfig(**{key: names.get(value, value) for key, value in settings.items()})
    with pytest.raises(ConfigError, match=message):
        tokenizers_from_config(cfg)


def test_train_py_trains_with_the_file_and_its_checkpoint_keeps_it(write_corpus, tmp_path):
    sentencepiece = train_sentencepiece(tmp_path)
    wordpiece = train_wordpiece(tmp_path)
    corpus = write_corpus({"train": (SRC, TGT), "valid": make_toy_pairs(20, seed=2)})
    common = ["debug=fast", "data=parallel_files", f"data.root={corpus}",
              "data.valid_split=valid", "data.test_splits=[]", "trainer.max_steps=2",
              f"data.cache_dir={tmp_path / 'cache'}"]
    train(compose_config([*common, f"data.tokenizer={sentencepiece}"]), tmp_path / "one")
    train(compose_config([*common, "data.joint_vocab=false", "model.share_embeddings=none",
                          f"data.src_tokenizer={sentencepiece}",
                          f"data.tgt_tokenizer={wordpiece}"]), tmp_path / "two")
    for run, (src_file, tgt_file) in [("one", (sentencepiece, sentencepiece)),
                                      ("two", (sentencepiece, wordpiece))]:
        state = read_checkpoint(tmp_path / run / "checkpoints" / "checkpoint_last.pt")
        src, tgt = read_tokenizers(state["tokenizer"])
        for stored, path in ((src, src_file), (tgt, tgt_file)):
            assert stored.to_str() == load_tokenizer_file(path).to_str()
        vocab = json.loads(json.dumps(state["config"]["data"]))
        assert vocab["tokenizer" if run == "one" else "src_tokenizer"] == str(sentencepiece)
        assert state["model"]["output_projection.weight"].shape[0] == tgt.vocab_size
