"""Several training corpora in one run (``data.extra_train``): counts per corpus per epoch
follow the weights, tags are one token at the start of each tagged source, the tokenizer
learns each corpus once, the cache knows the mix, and bad entries fail in one line."""

from __future__ import annotations

from collections import Counter

import pytest
from omegaconf import OmegaConf

from tests.conftest import make_toy_pairs
from tests.test_train import compose_config
from transformer.checkpoint import read_checkpoint
from transformer.config import DataConfig, ExtraCorpusConfig
from transformer.data import DataError, TokenBatchSampler, prepare_data
from transformer.data.mixing import MixedCorpus, mix
from transformer.trainer import train


@pytest.fixture(scope="module")
def corpora(write_corpus):
    """A main corpus and two extra ones, their sentences told apart by a first word."""
    def marked(n: int, seed: int, word: str) -> tuple[list[str], list[str]]:
        src, tgt = make_toy_pairs(n, seed)
        return [f"{word} {s}" for s in src], tgt

    main = write_corpus({"train": marked(60, 1, "main"), "valid": make_toy_pairs(10, 2)})
    back = write_corpus({"train": marked(20, 3, "back")})
    dist = write_corpus({"train": marked(15, 4, "dist")})
    return main, back, dist


def data_config(main, extras, tmp_path, **overrides) -> DataConfig:
    return DataConfig(source="parallel_files", root=str(main), valid_split="valid",
                      test_splits=[], vocab_size=300, cache_dir=str(tmp_path / "cache"),
                      extra_train=extras, **overrides)


def first_words(split, tokenizer) -> Counter:
    return Counter(tokenizer.decode(split.src_ids[i]).split()[0] for i in range(len(split)))


def test_each_corpus_appears_weight_times_an_epoch_and_tagged(corpora, tmp_path):
    main, back, dist = corpora
    extras = [ExtraCorpusConfig(root=str(back), weight=3, tag="<BT>"),
              ExtraCorpusConfig(root=str(dist), weight=2)]
    data = prepare_data(data_config(main, extras, tmp_path), log=lambda _: None)
    train_split = data.splits["train"]
    assert len(train_split) == 60 + 3 * 20 + 2 * 15
    tokenizer = data.src_tokenizer
    tag_id = tokenizer.token_to_id("<BT>")
    assert tag_id is not None and tag_id > 3  # a token of its own, after the specials
    tagged = [i for i in range(len(train_split)) if train_split.src_ids[i][0] == tag_id]
    assert len(tagged) == 60  # every pair of the tagged corpus, and only those
    assert all(tokenizer.decode(train_split.src_ids[i][1:]).startswith("back")
               for i in tagged)
    assert tag_id not in {token for i in range(len(train_split)) if i not in set(tagged)
                          for token in train_split.src_ids[i]}

    # An epoch of the training sampler visits each copy once: counts follow the weights.
    sampler = TokenBatchSampler.for_split(train_split, 200, shuffle=True, seed=1)
    visits = Counter()
    for batch in sampler.batches(epoch=0):
        for index in batch:
            text = tokenizer.decode(train_split.src_ids[index])  # the tag is special: dropped
            visits[text.split()[0]] += 1
    assert visits == {"main": 60, "back": 60, "dist": 30}
    assert first_words(data.splits["valid"], tokenizer)  # val is the main corpus's alone


def test_the_tokenizer_learns_each_corpus_once(corpora, tmp_path):
    main, back, _ = corpora
    once = prepare_data(data_config(main, [ExtraCorpusConfig(root=str(back), weight=1)],
                                    tmp_path / "once"), log=lambda _: None)
    many = prepare_data(data_config(main, [ExtraCorpusConfig(root=str(back), weight=5)],
                                    tmp_path / "many"), log=lambda _: None)
    assert once.src_tokenizer.to_str() == many.src_tokenizer.to_str()
    assert len(many.splits["train"]) == 60 + 5 * 20


def test_the_mix_is_part_of_the_cache_key(corpora, tmp_path):
    main, back, _ = corpora
    plain = prepare_data(data_config(main, [], tmp_path), log=lambda _: None)
    mixed = prepare_data(data_config(main, [ExtraCorpusConfig(root=str(back), tag="<BT>")],
                                     tmp_path), log=lambda _: None)
    weighted = prepare_data(data_config(main, [ExtraCorpusConfig(root=str(back), weight=2,
                                                                 tag="<BT>")], tmp_path),
                            log=lambda _: None)
    assert len({plain.cache_dir, mixed.cache_dir, weighted.cache_dir}) == 3  # tokenizers
    assert len(mixed.splits["train"]) == 80 and len(weighted.splits["train"]) == 100
    assert plain.src_tokenizer.token_to_id("<BT>") is None


@pytest.mark.parametrize(("entry", "message"), [
    (dict(root="/does/not/exist"), r"data\.extra_train\[0\]\.root=/does/not/exist is not a "
                                   "directory"),
    (dict(weight=0), r"data\.extra_train\[0\]\.weight=0: the copies"),
    (dict(tag="<B T>"), r"data\.extra_train\[0\]\.tag='<B T>': one token without spaces"),
    (dict(split="nope"), r"split 'nope' not found"),
])
def test_a_bad_entry_is_named(corpora, tmp_path, entry, message):
    main, back, _ = corpora
    extra = ExtraCorpusConfig(**{"root": str(back), **entry})
    with pytest.raises(DataError, match=message):
        prepare_data(data_config(main, [extra], tmp_path), log=lambda _: None)


def test_no_extra_corpora_leave_the_corpus_as_it_is(corpora, tmp_path):
    main, back, _ = corpora
    cfg = data_config(main, [], tmp_path)
    sentinel = object()
    assert mix(sentinel, cfg) is sentinel
    assert isinstance(mix(sentinel, data_config(main, [ExtraCorpusConfig(root=str(back))],
                                                tmp_path)), MixedCorpus)


def test_train_py_trains_on_a_mix_given_on_the_command_line(corpora, tmp_path):
    main, back, _ = corpora
    cfg = compose_config(["debug=fast", "data=parallel_files", f"data.root={main}",
                          "data.valid_split=valid", "data.test_splits=[]",
                          f"data.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=2",
                          f"data.extra_train=[{{root: '{back}', weight: 2, tag: '<BT>'}}]"])
    extra = OmegaConf.to_object(cfg.data).extra_train[0]
    assert (extra.root, extra.weight, extra.tag, extra.split) == (str(back), 2, "<BT>", "train")
    train(cfg, tmp_path / "run")
    state = read_checkpoint(tmp_path / "run" / "checkpoints" / "checkpoint_last.pt")
    assert state["step"] == 2
    assert state["config"]["data"]["extra_train"][0]["tag"] == "<BT>"  # recorded
