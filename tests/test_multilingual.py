"""One model for several directions (``data.pairs``; transformer/data/multilingual.py): each
source starts with its target language's tag, a token of its own; validation scores each
direction apart; evaluate.py and mode=generate put the tag of ``tgt_lang`` before each
source, and mode=splits scores every direction. Toy corpora: English with German and French
word-for-word translations, told apart by their words."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tests.conftest import make_toy_pairs
from tests.test_evaluate import eval_config, hyp_file
from tests.test_train import compose_config, events
from transformer.config import ConfigError, DataConfig, validate
from transformer.data import DataError, prepare_data, read_lines
from transformer.data.multilingual import direction_indices, language_tag, tag_sources
from transformer.evaluation import evaluate, load_models
from transformer.trainer import train
from transformer.translation import translate

pytestmark = pytest.mark.usefixtures("one_thread")
FRENCH = {"ein": "un", "Mann": "homme", "Hund": "chien", "läuft": "court", "roter": "rouge",
          "Ball": "balle", "auf": "sur", "dem": "le", "Rasen": "gazon", "zwei": "deux",
          "Kinder": "enfants", "spielen": "jouent"}


def en_de_fr(n: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    en, de = make_toy_pairs(n, seed)
    fr = [" ".join(FRENCH[word.rstrip(".")] for word in line.split()) + "." for line in de]
    return en, de, fr


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """train and valid in en, de and fr; test in en and de only (no French test set)."""
    root = tmp_path_factory.mktemp("multilingual")
    for split, (n, seed) in {"train": (120, 1), "valid": (12, 2), "test": (10, 3)}.items():
        for lang, lines in zip(("en", "de", "fr"), en_de_fr(n, seed), strict=True):
            if not (split == "test" and lang == "fr"):
                (root / f"{split}.{lang}").write_text("".join(f"{line}\n" for line in lines))
    return root


def data_config(root, tmp_path, **overrides) -> DataConfig:
    return DataConfig(source="parallel_files", root=str(root), valid_split="valid",
                      test_splits=["test"], vocab_size=300, max_tokens=256,
                      cache_dir=str(tmp_path / "cache"),
                      **{"pairs": ["en-de", "en-fr"], **overrides})


def test_each_direction_follows_the_other_tagged_with_its_target(corpus, tmp_path):
    data = prepare_data(data_config(corpus, tmp_path), log=lambda _: None)
    tokenizer, train_split = data.src_tokenizer, data.splits["train"]
    en, de, fr = en_de_fr(120, 1)
    assert len(train_split) == 240
    tag_de, tag_fr = tokenizer.token_to_id("<2de>"), tokenizer.token_to_id("<2fr>")
    assert 3 < tag_de < 10 and 3 < tag_fr < 10  # tokens of their own, after the specials
    assert tokenizer.tokens("<2fr> a dog.")[0] == "<2fr>"
    assert [ids[0] for ids in train_split.src_ids] == [tag_de] * 120 + [tag_fr] * 120
    assert list(train_split.tgt_text) == de + fr
    assert list(train_split.src_text) == tag_sources(en, "<2de>") + tag_sources(en, "<2fr>")
    assert data.tgt_tokenizer.decode(train_split.tgt_ids[130]) == fr[10]
    # The test split has no French: it is the en-de pairs alone.
    test = prepare_data(data_config(corpus, tmp_path), ["test"], log=lambda _: None)
    assert {ids[0] for ids in test.splits["test"].src_ids} == {tag_de}


def test_the_directions_are_part_of_the_cache_key(corpus, tmp_path):
    both = prepare_data(data_config(corpus, tmp_path), ["train"], log=lambda _: None)
    one = prepare_data(data_config(corpus, tmp_path, pairs=["en-fr"]), ["train"],
                       log=lambda _: None)
    plain = prepare_data(data_config(corpus, tmp_path, pairs=[], tgt_lang="fr"), ["train"],
                         log=lambda _: None)
    assert len({both.cache_dir, one.cache_dir, plain.cache_dir}) == 3
    assert "en-de+en-fr" in both.cache_dir.name
    assert plain.src_tokenizer.token_to_id("<2fr>") is None  # no tags without pairs
    assert len(one.splits["train"]) == len(plain.splits["train"]) == 120


def test_direction_indices_by_first_token():
    groups = direction_indices([7, 5, 5, 9, 7, -1], {"en-de": 5, "en-fr": 7, "en-cs": 8})
    assert groups == {"en-de": [1, 2], "en-fr": [0, 4], "en-cs": []}


def test_tags_go_before_sentences_but_not_empty_lines():
    assert tag_sources(["a dog.", "", "  "], language_tag("fr")) == ["<2fr> a dog.", "", "  "]


@pytest.mark.parametrize(("pairs", "extra", "message"), [
    (["en_de"], [], r"data\.pairs\[0\]='en_de' is not a direction like 'en-de'"),
    (["en-de", "en-de"], [], r"names a direction twice"),
    (["en-de"], ["data=hub"], r"data\.pairs needs data=multi30k or data=parallel_files"),
    (["en-de"], ["data.extra_train=[{root: /tmp}]"], r"data\.extra_train is not supported"),
])
def test_bad_pairs_are_named(pairs, extra, message):
    cfg = compose_config([f"data.pairs=[{','.join(pairs)}]", *extra])
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_a_split_no_direction_has_is_named(corpus, tmp_path):
    with pytest.raises(DataError, match=r"split 'nope' not found for any of the directions"):
        prepare_data(data_config(corpus, tmp_path), ["nope"], log=lambda _: None)


@pytest.fixture(scope="module")
def run_dir(corpus, tmp_path_factory):
    """A multilingual run of a few steps, trained through train.py's config."""
    tmp = tmp_path_factory.mktemp("multilingual_run")
    cfg = compose_config(["debug=fast", "data=parallel_files", f"data.root={corpus}",
                          "data.valid_split=valid", "data.test_splits=[test]",
                          "data.vocab_size=300", f"data.cache_dir={tmp / 'cache'}",
                          "data.pairs=[en-de,en-fr]", "trainer.max_steps=4",
                          "trainer.val_every_steps=4", "trainer.save_every_steps=4"])
    train(cfg, tmp / "run")
    return tmp / "run"


def test_validation_scores_each_direction(run_dir):
    tags = set(events(run_dir).Tags()["scalars"])
    assert {"val/bleu", "val/bleu/en-de", "val/bleu/en-fr"} <= tags
    mean = events(run_dir).Scalars("val/bleu")[-1].value
    per_direction = [events(run_dir).Scalars(f"val/bleu/{d}")[-1].value
                     for d in ("en-de", "en-fr")]
    assert mean == pytest.approx(sum(per_direction) / 2)


def test_evaluate_scores_every_direction_or_the_one_asked_for(run_dir, corpus, tmp_path):
    checkpoint = str(run_dir / "checkpoints" / "checkpoint_last.pt")
    every = evaluate(eval_config(checkpoint=checkpoint, splits=["valid", "test"],
                                 data_root=str(corpus), output_dir=str(tmp_path / "all")))
    assert set(every) == {"valid.en-de", "valid.en-fr", "test.en-de"}  # no French test set
    french = evaluate(eval_config(checkpoint=checkpoint, splits=["valid"], tgt_lang="fr",
                                  data_root=str(corpus), output_dir=str(tmp_path / "fr")))
    assert set(french) == {"valid.en-fr"}
    assert french["valid.en-fr"]["bleu"] == every["valid.en-fr"]["bleu"]


def test_files_and_generate_put_the_tag_of_tgt_lang_first(run_dir, corpus, tmp_path):
    """The translations of mode=files and mode=generate with tgt_lang=fr are those of the
    Python API given the tagged sentences."""
    checkpoint = str(run_dir / "checkpoints" / "checkpoint_last.pt")
    sources = read_lines(corpus / "valid.en")
    evaluate(eval_config(checkpoint=checkpoint, mode="files", src_file=str(corpus / "valid.en"),
                         tgt_lang="fr", output_dir=str(tmp_path)))
    evaluate(eval_config(checkpoint=checkpoint, mode="generate", tgt_lang="fr",
                         src_file=str(corpus / "valid.en"), output_file=str(tmp_path / "gen")))
    model, tokenizer, _ = load_models([checkpoint], 0, "cpu")
    config = eval_config()
    expected = translate(model, tokenizer, tag_sources(sources, "<2fr>"), beam=config.beam,
                         max_len_b=config.max_len_b)
    assert read_lines(hyp_file(tmp_path, "valid.en")) == expected
    assert read_lines(tmp_path / "gen") == expected


@pytest.mark.parametrize(("mode", "tgt_lang", "message"), [
    ("files", None, r"translates into de, fr .*: set tgt_lang to one of them"),
    ("files", "cs", r"tgt_lang=cs is not a language the model translates into \(de, fr\)"),
])
def test_a_missing_or_unknown_tgt_lang_is_named(run_dir, corpus, mode, tgt_lang, message):
    checkpoint = str(run_dir / "checkpoints" / "checkpoint_last.pt")
    with pytest.raises(DataError, match=message):
        evaluate(eval_config(checkpoint=checkpoint, mode=mode, tgt_lang=tgt_lang,
                             src_file=str(corpus / "valid.en")))


def test_a_one_direction_model_takes_only_its_own_tgt_lang(tmp_path):
    from tests.test_evaluate import make_checkpoint

    checkpoint = make_checkpoint(tmp_path / "a.pt")
    data = OmegaConf.structured(DataConfig())
    assert (data.src_lang, data.tgt_lang) == ("en", "de")
    with pytest.raises(DataError, match=r"tgt_lang=fr: the model translates en -> de only"):
        evaluate(eval_config(checkpoint=str(checkpoint), mode="interactive", tgt_lang="fr"))
