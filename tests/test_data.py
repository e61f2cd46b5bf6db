"""The data pipeline on tiny corpora written here and on the real Multi30k files: reading,
bad data, caching, the hub source, token-bounded batching, and scripts/prepare_data.py."""

from __future__ import annotations

import gzip
import json
import os
import re
import runpy
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from transformer.config import DataConfig, register_configs
from transformer.data import (
    Batch,
    DataError,
    Ragged,
    TokenBatchSampler,
    collate,
    corpora,
    iterate_batches,
    prepare,
    prepare_data,
    read_lines,
    sampler,
)
from transformer.data.text import iter_parallel_chunks
from transformer.tokenizer import BOS_ID, EOS_ID, PAD_ID

REPO = Path(__file__).resolve().parents[1]
PREPARE_DATA = REPO / "scripts" / "prepare_data.py"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Nothing here may touch the network: a connection attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def data_config(overrides: list[str]) -> DataConfig:
    """``cfg.data`` as train.py and prepare_data.py compose it."""
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return OmegaConf.to_object(compose("train", overrides=overrides).data)


def files_config(root: Path, cache: Path, **overrides) -> DataConfig:
    """A parallel_files config over ``root`` with splits train / valid / test."""
    options = dict(valid_split="valid", test_splits=["test"], vocab_size=300, max_tokens=256,
                   cache_dir=str(cache))
    return DataConfig(source="parallel_files", root=str(root), **{**options, **overrides})


def prepare_data_cli(args: list[str], cwd: Path, multi30k_dir: Path | None = None
                     ) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items() if key != "MULTI30K_DIR"}
    if multi30k_dir is not None:
        env["MULTI30K_DIR"] = str(multi30k_dir)
    return subprocess.Popen([sys.executable, str(PREPARE_DATA), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ----------------------------------------------------------------------------- reading

def test_lines_end_at_newline_only(tmp_path):
    # datasets' text loader would cut "lone\rreturn" in two and misalign the sides
    raw = "\ufefffirst\r\nlone\rreturn\n\nlast without newline".encode()
    for path, data in ((tmp_path / "a.txt", raw), (tmp_path / "a.txt.gz", gzip.compress(raw))):
        path.write_bytes(data)
        assert read_lines(path) == ["first", "lone\rreturn", "", "last without newline"]
    (tmp_path / "empty.txt").write_bytes(b"")
    assert read_lines(tmp_path / "empty.txt") == []


@pytest.mark.parametrize("gz", [False, True])
def test_bytes_that_are_not_utf8_name_file_and_line(tmp_path, gz):
    path = tmp_path / ("bad.de.gz" if gz else "bad.de")
    data = b"eins\nzwei\ndrei \xff\xfe\nvier\n"
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError, match=rf"{path.name}:3: bytes that are not UTF-8"):
        read_lines(path)


@pytest.mark.parametrize("size", [1, 2, 3, 100])
def test_chunked_reading_gives_the_lines_of_read_lines(tmp_path, size):
    raw = "\ufefffirst\r\nlone\rreturn\n\nvier\r\nfünf\nlast without newline".encode()
    (tmp_path / "a.en").write_bytes(raw)
    (tmp_path / "a.de.gz").write_bytes(gzip.compress(raw))
    chunks = list(iter_parallel_chunks(tmp_path / "a.en", tmp_path / "a.de.gz", size))
    assert all(len(src) == size for src, _ in chunks[:-1])
    for side in (0, 1):
        assert [line for chunk in chunks for line in chunk[side]] == read_lines(tmp_path / "a.en")
    (tmp_path / "b.de").write_bytes(b"eins\nzwei\ndrei\nvier\n\xff\n")  # line 5, chunk 3
    (tmp_path / "b.en").write_bytes(b"1\n2\n3\n4\n5\n")
    with pytest.raises(DataError, match=r"b\.de:5: bytes that are not UTF-8"):
        list(iter_parallel_chunks(tmp_path / "b.en", tmp_path / "b.de", 2))
    (tmp_path / "c.de").write_bytes(b"1\n2\n3\n")
    with pytest.raises(DataError, match=r"b\.en has 5 lines, .*c\.de has 3"):
        list(iter_parallel_chunks(tmp_path / "b.en", tmp_path / "c.de", 2))


def test_a_broken_gzip_file_is_named(tmp_path):
    (tmp_path / "train.en.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match=r"train\.en\.gz: not a readable gzip file"):
        read_lines(tmp_path / "train.en.gz")


# ----------------------------------------------------------------------------- bad data

OTHER_SPLITS = {"train": (["a"], ["x"]), "valid": (["b"], ["y"]), "test": (["c"], ["z"])}
BAD = {  # name: (files besides OTHER_SPLITS, config overrides, the error message's pattern)
    "line_counts": ({"train": (["a", "b", "c"], ["x", "y"])}, {},
                    r"line counts differ: \S+train\.en has 3 lines, \S+train\.de has 2"),
    "not_utf8": ({"train": (b"ok\nbad \xc3\x28 byte\n", ["x", "y"])}, {},
                 r"\S+train\.en:2: bytes that are not UTF-8"),
    "missing_split": ({"test": None}, {},
                      r"split 'test' not found for en-de in \S+; splits found: train, valid"),
    "long_eval": ({"valid": (["b", "b " * 30], ["y", "y"])}, {"max_len": 20},
                  r"line 2 of \S+valid\.en and \S+valid\.de: \d+ source / \d+ target tokens, "
                  r"more than data\.max_len=20; set data\.allow_long_eval=true"),
}


def write_bad_case(write_corpus, name: str) -> tuple[Path, dict]:
    files, overrides, _ = BAD[name]
    files = {split: sides for split, sides in {**OTHER_SPLITS, **files}.items() if sides}
    return write_corpus(files), overrides


@pytest.mark.parametrize("name", BAD)
def test_bad_data_raises_one_line_naming_the_file(write_corpus, tmp_path, name):
    root, overrides = write_bad_case(write_corpus, name)
    with pytest.raises(DataError, match=BAD[name][2]) as error:
        prepare_data(files_config(root, tmp_path / "cache", **overrides), log=lambda _: None)
    assert "\n" not in str(error.value)
    assert not [path for path in tmp_path.rglob("*") if ".part" in path.name
                or path.name.startswith(".")], "a half-written cache entry was left"


def test_empty_and_long_pairs_are_dropped_and_counted(write_corpus, tmp_path):
    long_line = "word " * 40
    root = write_corpus({
        "train": (["a b", "", "  ", "c d", long_line, "e"], ["x y", "x", "y", "", "z", long_line]),
        "valid": (["a", ""], ["x", "y"]), "test": (["a"], ["x"])})
    data = prepare_data(files_config(root, tmp_path / "cache", max_len=20), log=lambda _: None)
    train = data.splits["train"]
    assert (train.stats.read, train.stats.kept) == (6, 1)
    assert train.stats.dropped == {"empty": 3, "too_long": 2}
    assert list(train.src_text) == ["a b"] and list(train.tgt_text) == ["x y"]
    assert data.splits["valid"].stats.dropped == {"empty": 1, "too_long": 0}
    table = data.stats_table()
    assert "5 (3 empty, 2 too long)" in table and "1 (1 empty)" in table


def test_a_lone_carriage_return_does_not_shift_the_sides(write_corpus, tmp_path):
    root = write_corpus({**OTHER_SPLITS, "train": (b"one\rtwo\nthree\r\n", b"eins zwei\ndrei\n")})
    train = prepare_data(files_config(root, tmp_path), log=lambda _: None).splits["train"]
    assert list(train.src_text) == ["one\rtwo", "three"]
    assert list(train.tgt_text) == ["eins zwei", "drei"]


def test_long_eval_pairs_are_truncated_when_allowed(write_corpus, tmp_path):
    root = write_corpus({"train": (["a"], ["x"]), "valid": (["b " * 30], ["y"]),
                         "test": (["c"], ["z"])})
    cfg = files_config(root, tmp_path / "cache", max_len=20, allow_long_eval=True)
    valid = prepare_data(cfg, log=lambda _: None).splits["valid"]
    assert valid.stats.truncated == 1 and len(valid.src_ids[0]) == 20
    assert valid.src_text[0] == "b " * 30  # the reference stays whole


def test_unusable_configs_name_their_key(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="data.source='csv' is not one of"):
        prepare_data(DataConfig(source="csv", cache_dir=str(tmp_path)))
    with pytest.raises(DataError, match="data.root=None is not a directory"):
        prepare_data(DataConfig(source="parallel_files", cache_dir=str(tmp_path)))
    with pytest.raises(DataError, match="data.hub_name is not set"):
        prepare_data(DataConfig(source="hub", cache_dir=str(tmp_path)))


def test_multi30k_pair_without_a_test_split_lists_the_splits_found(multi30k_dir, tmp_path):
    cfg = DataConfig(root=str(multi30k_dir), tgt_lang="cs", cache_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"split 'test_2017_flickr' not found for en-cs in "
                       r"\S+; splits found: test_2016_flickr, train, val$"):
        prepare_data(cfg)


# ----------------------------------------------------------------------------- download

@pytest.fixture
def multi30k_stand_in(write_corpus, toy_pairs) -> Path:
    """Tiny files named like Multi30k's, for a fake download to copy."""
    return write_corpus({"train": toy_pairs(50), "val": toy_pairs(5, seed=1),
                         "test_2016_flickr": toy_pairs(5, seed=2)}, gz=True)


def test_multi30k_is_downloaded_when_no_folder_is_set(multi30k_stand_in, tmp_path,
                                                      monkeypatch):
    fetched = []

    def fake_download(url: str, path: Path) -> None:
        fetched.append(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(multi30k_stand_in / url.rsplit("/", 1)[1], path)

    monkeypatch.delenv("MULTI30K_DIR", raising=False)
    monkeypatch.setattr(corpora, "download", fake_download)
    cfg = DataConfig(test_splits=["test_2016_flickr"], vocab_size=300,
                     cache_dir=str(tmp_path / "cache"))
    for _ in range(2):  # the second run finds the files in the cache
        data = prepare_data(cfg, log=lambda _: None)
    assert len(fetched) == 6 and fetched[0].startswith("https://github.com/multi30k/dataset/")
    assert len(data.splits["train"]) == 50
    assert (tmp_path / "cache" / "multi30k" / "val.de.gz").exists()


def test_offline_without_multi30k_says_what_to_set(tmp_path, monkeypatch):
    def offline(url: str, path: Path) -> None:
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.delenv("MULTI30K_DIR", raising=False)
    monkeypatch.setattr(corpora, "download", offline)
    with pytest.raises(DataError, match=r"Multi30k not found: data.root and MULTI30K_DIR are "
                       r"not set, and downloading https://\S+/train.en.gz failed .*name "
                       r"resolution.*; set MULTI30K_DIR or data.root"):
        prepare_data(DataConfig(cache_dir=str(tmp_path)))
    with pytest.raises(DataError, match=r"/nowhere does not exist and data.download=false; "
                       r"set MULTI30K_DIR or data.root"):
        prepare_data(DataConfig(root="/nowhere", download=False, cache_dir=str(tmp_path)))


# ----------------------------------------------------------------------------- encoding, cache

def test_splits_hold_ids_and_raw_text(tiny_data_cfg, toy_pairs):
    data = prepare_data(tiny_data_cfg, log=lambda _: None)
    assert data.src_tokenizer is data.tgt_tokenizer  # joint vocabulary
    src, tgt = toy_pairs(40, seed=2)
    valid = data.splits["valid"]
    assert len(valid) == 40 and valid.src_text[:] == src and list(valid.tgt_text) == tgt
    assert valid.src_ids[3] == data.src_tokenizer.encode(src[3])
    assert [data.tgt_tokenizer.decode(ids) for ids in valid.tgt_ids] == tgt
    assert valid.stats.src_tokens == int(valid.src_ids.lengths.sum())


def test_second_run_loads_the_cached_tokenizer_and_splits(tiny_data_cfg):
    first_log, second_log = [], []
    first = prepare_data(tiny_data_cfg, log=first_log.append)
    second = prepare_data(tiny_data_cfg, log=second_log.append)
    assert any(line.startswith("tokenizer: trained") for line in first_log)
    assert any(line.startswith("tokenizer: loaded") for line in second_log)
    assert not any("trained" in line or "from corpus" in line for line in second_log)
    assert all(split.stats.cached for split in second.splits.values())
    assert first.src_tokenizer.to_str() == second.src_tokenizer.to_str()
    assert list(first.splits["train"].src_ids) == list(second.splits["train"].src_ids)
    assert second.splits["train"].stats.read == 300


def test_changed_options_or_files_miss_the_cache(tiny_data_cfg):
    base = prepare_data(tiny_data_cfg, log=lambda _: None).cache_dir
    assert prepare_data(tiny_data_cfg, splits=["valid"], log=lambda _: None).cache_dir == base
    other_vocab = DataConfig(**{**vars(tiny_data_cfg), "vocab_size": 280})
    assert prepare_data(other_vocab, log=lambda _: None).cache_dir != base
    train_file = Path(tiny_data_cfg.root) / "train.en"
    train_file.write_text(train_file.read_text() + "one more.\n")
    (Path(tiny_data_cfg.root) / "train.de").open("a").write("noch einer.\n")
    changed = prepare_data(tiny_data_cfg, log=lambda _: None)
    assert changed.cache_dir != base and len(changed.splits["train"]) == 301


def test_separate_vocabularies(tiny_data_cfg):
    cfg = DataConfig(**{**vars(tiny_data_cfg), "joint_vocab": False})
    data = prepare_data(cfg, log=lambda _: None)
    assert data.src_tokenizer is not data.tgt_tokenizer
    assert {p.name for p in data.cache_dir.glob("*.json")} == {"src_tokenizer.json",
                                                               "tgt_tokenizer.json"}
    assert "Hund" not in data.src_tokenizer.tokens("Hund")  # English-only merges
    assert data.tgt_tokenizer.tokens("Hund") == ["▁Hund"]


def test_gzipped_and_plain_files_give_the_same_ids(write_corpus, tmp_path, toy_pairs):
    splits = {"train": toy_pairs(100), "valid": toy_pairs(5, 1), "test": toy_pairs(5, 2)}
    ids = []
    for gz in (False, True):
        cfg = files_config(write_corpus(splits, gz=gz), tmp_path / f"cache{gz}")
        ids.append(list(prepare_data(cfg, log=lambda _: None).splits["train"].tgt_ids))
    assert ids[0] == ids[1]


def test_racing_writers_all_get_the_first_file(tmp_path):
    path = tmp_path / "tokenizer.json"
    prepare._write_once(path, lambda partial: partial.write_text("first"))
    prepare._write_once(path, lambda partial: partial.write_text("second"))
    assert path.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_ragged_rows_behave_like_a_list():
    rows = [[5, 6], [], [7, 8, 9]]
    lengths = np.array([len(row) for row in rows])
    ragged = Ragged(np.array(sum(rows, []), dtype=np.int32),
                    np.concatenate([[0], np.cumsum(lengths)]))
    assert len(ragged) == 3 and list(ragged) == rows and ragged[-1] == [7, 8, 9]
    assert ragged[1:] == rows[1:] and list(ragged.lengths) == [2, 0, 3]
    with pytest.raises(IndexError):
        ragged[3]


# ----------------------------------------------------------------------------- hub

def write_jsonl_hub(root: Path, splits: dict[str, tuple[list[str], list[str]]]) -> Path:
    """A local stand-in for a Hub dataset: {split}.jsonl of {"translation": {en, de}}."""
    root.mkdir()
    for split, (src, tgt) in splits.items():
        rows = (json.dumps({"translation": {"en": s, "de": t}})
                for s, t in zip(src, tgt, strict=True))
        (root / f"{split}.jsonl").write_text("".join(f"{row}\n" for row in rows))
    return root


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory, toy_pairs) -> Path:
    return write_jsonl_hub(tmp_path_factory.mktemp("hub") / "toy", {
        "train": toy_pairs(200), "validation": toy_pairs(20, 1), "test": toy_pairs(20, 2)})


def hub_config(name: Path, cache: Path, **overrides) -> DataConfig:
    return DataConfig(source="hub", hub_name=str(name), valid_split="validation",
                      test_splits=["test"], vocab_size=300, cache_dir=str(cache), **overrides)


def test_hub_streaming_and_in_memory_agree(hub_dir, tmp_path, toy_pairs):
    loaded = [prepare_data(hub_config(hub_dir, tmp_path / str(streaming), streaming=streaming),
                           log=lambda _: None) for streaming in (False, True)]
    for name in ("train", "validation", "test"):
        in_memory, streamed = (data.splits[name] for data in loaded)
        assert list(in_memory.src_ids) == list(streamed.src_ids)
        assert list(in_memory.tgt_text) == list(streamed.tgt_text)
    assert loaded[0].splits["test"].src_text[:] == toy_pairs(20, 2)[0]


def test_hub_dataset_saved_to_disk(tmp_path, toy_pairs):
    import datasets

    src, tgt = toy_pairs(30)
    rows = [{"en": s, "de": t} for s, t in zip(src, tgt, strict=True)]
    datasets.DatasetDict({split: datasets.Dataset.from_dict({"translation": rows})
                          for split in ("train", "validation", "test")}
                         ).save_to_disk(tmp_path / "saved")
    data = prepare_data(hub_config(tmp_path / "saved", tmp_path / "cache"), log=lambda _: None)
    assert list(data.splits["validation"].tgt_text) == tgt


def test_hub_errors_name_the_split_or_language(hub_dir, tmp_path):
    with pytest.raises(DataError, match="split 'valid' not found in hub dataset .*"
                       "splits found: train, validation, test"):
        prepare_data(DataConfig(**{**vars(hub_config(hub_dir, tmp_path)), "valid_split": "valid"}),
                     log=lambda _: None)
    with pytest.raises(DataError, match="has no language 'fr' \\(found: en, de\\)"):
        prepare_data(hub_config(hub_dir, tmp_path, tgt_lang="fr"), log=lambda _: None)


# ----------------------------------------------------------------------------- batching

def random_lengths(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(2, 60, n), rng.integers(2, 60, n)


def greedy_batches(order, widths, max_tokens, max_sentences):
    """The reference: ``_fill_batches`` as a loop over pairs."""
    max_sentences = max_sentences or len(order) or 1
    batches, first, widest = [], 0, 0
    for position, width in enumerate(widths[order].tolist()):
        widest = max(widest, width)
        size = position - first + 1
        if size * widest > max_tokens or size > max_sentences:
            batches.append(order[first:position].tolist())
            first, widest = position, width
    return batches + ([order[first:].tolist()] if first < len(order) else [])


@settings(max_examples=60, deadline=None)
@given(widths=st.lists(st.integers(1, 60), max_size=300), sort=st.booleans(),
       max_tokens=st.integers(60, 500), max_sentences=st.none() | st.integers(1, 9))
def test_batches_are_cut_as_by_a_loop_over_pairs(widths, sort, max_tokens, max_sentences):
    widths = np.array(widths, dtype=np.int64)
    order = np.argsort(widths, kind="stable") if sort else np.arange(len(widths))[::-1]
    batches = sampler._fill_batches(order, widths, max_tokens, max_sentences)
    assert [batch.tolist() for batch in batches] == greedy_batches(order, widths, max_tokens,
                                                                   max_sentences)


@settings(max_examples=40, deadline=None)
@given(keys=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9), st.integers(0, 9)),
                     max_size=200), big=st.booleans())
def test_packed_sort_is_lexsort(keys, big):
    columns = [np.array([key[k] for key in keys], dtype=np.int64) << (30 if big else 0)
               for k in range(3)]  # big: too wide to pack, lexsort itself
    assert sampler._stable_sort_by(*columns).tolist() == np.lexsort(columns[::-1]).tolist()


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.tuples(st.integers(1, 50), st.integers(1, 50)), max_size=120),
       max_tokens=st.integers(50, 400), max_sentences=st.none() | st.integers(1, 8),
       world_size=st.integers(1, 3), epoch=st.integers(0, 3))
def test_batches_fit_max_tokens_and_cover_each_pair_once(lengths, max_tokens, max_sentences,
                                                         world_size, epoch):
    src, tgt = (np.array([pair[side] for pair in lengths], dtype=int) for side in (0, 1))
    samplers = [TokenBatchSampler(src, tgt, max_tokens, max_sentences, seed=7, rank=rank,
                                  world_size=world_size) for rank in range(world_size)]
    per_rank = [sampler.batches(epoch) for sampler in samplers]
    assert all(len(batches) == len(samplers[0]) for batches in per_rank)  # equal shares
    covered = sorted(i for batches in per_rank for batch in batches for i in batch)
    for batches in per_rank:
        for batch in batches:
            assert 0 < len(batch) <= (max_sentences or len(lengths))
            assert len(batch) * max(max(src[batch]), max(tgt[batch])) <= max_tokens
    if world_size == 1:
        assert covered == list(range(len(lengths)))  # exactly once
    else:  # ranks may repeat a few batches to even out their shares, never skip a pair
        assert set(covered) == set(range(len(lengths)))


def test_same_seed_same_batches_other_epoch_other_order():
    src, tgt = random_lengths(2000)
    sampler = TokenBatchSampler(src, tgt, max_tokens=1000, seed=3)
    epoch0, epoch1 = sampler.batches(0), sampler.batches(1)
    assert TokenBatchSampler(src, tgt, max_tokens=1000, seed=3).batches(0) == epoch0
    assert epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0)  # same batches, reordered
    assert TokenBatchSampler(src, tgt, max_tokens=1000, seed=4).batches(0) != epoch0
    assert len(sampler) == len(epoch0)


def test_resuming_at_a_batch_gives_the_rest_of_the_epoch():
    src, tgt = random_lengths(1000)
    sampler = TokenBatchSampler(src, tgt, max_tokens=800, seed=5, rank=1, world_size=2)
    for epoch, k in ((0, 0), (2, 7), (2, len(sampler)), (3, len(sampler) - 1)):
        assert sampler.batches(epoch, start=k) == sampler.batches(epoch)[k:]


def test_unshuffled_batches_go_shortest_first():
    src, tgt = random_lengths(500)
    sampler = TokenBatchSampler(src, tgt, max_tokens=600, shuffle=False)
    assert sampler.batches(0) == sampler.batches(5)
    widest = [max(max(src[batch]), max(tgt[batch])) for batch in sampler.batches(0)]
    assert widest == sorted(widest)


def test_a_pair_wider_than_max_tokens_is_an_error():
    with pytest.raises(DataError, match=r"1 pair\(s\) do not fit in max_tokens=50 .* pair 2 "
                       r"with 3 source and 51 target tokens"):
        TokenBatchSampler([3, 4, 3], [3, 4, 51], max_tokens=50)
    assert TokenBatchSampler([], [], max_tokens=50).batches(0) == []


def test_collate_pads_and_shifts(tiny_data_cfg):
    split = prepare_data(tiny_data_cfg, splits=["train"], log=lambda _: None).splits["train"]
    indices = [4, 0, 17]
    batch = collate(split, indices)
    src_rows = [split.src_ids[i] for i in indices]
    tgt_rows = [split.tgt_ids[i] for i in indices]
    longest = max(map(len, tgt_rows))
    assert batch.src_tokens.shape == (3, max(map(len, src_rows)) + 1)
    assert batch.tgt_input.shape == batch.tgt_output.shape == (3, longest + 1)
    assert batch.src_tokens.dtype == torch.long and batch.indices == indices
    for b, (src, tgt) in enumerate(zip(src_rows, tgt_rows, strict=True)):
        assert batch.src_tokens[b].tolist() == src + [EOS_ID] + [PAD_ID] * (
            batch.src_tokens.shape[1] - len(src) - 1)
        assert batch.tgt_input[b, : len(tgt) + 1].tolist() == [BOS_ID] + tgt
        assert batch.tgt_output[b, : len(tgt) + 1].tolist() == tgt + [EOS_ID]
        assert (batch.tgt_output[b, len(tgt) + 1:] == PAD_ID).all()
    assert batch.n_src_tokens == int((batch.src_tokens != PAD_ID).sum())
    assert batch.n_tgt_tokens == int((batch.tgt_output != PAD_ID).sum())
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.tgt_input, batch.tgt_input)


def test_iterated_batches_respect_max_tokens_and_cover_the_split(tiny_data_cfg):
    split = prepare_data(tiny_data_cfg, splits=["train"], log=lambda _: None).splits["train"]
    sampler = TokenBatchSampler.for_split(split, max_tokens=128, seed=2)
    batches = list(iterate_batches(split, sampler, epoch=1))
    assert [b.indices for b in batches] == sampler.batches(1)
    assert sorted(i for b in batches for i in b.indices) == list(range(len(split)))
    for batch in batches:
        assert batch.src_tokens.numel() <= 128 and batch.tgt_output.numel() <= 128
    resumed = list(iterate_batches(split, sampler, epoch=1, start=3))
    assert [b.indices for b in resumed] == [b.indices for b in batches[3:]]


# ----------------------------------------------------------------------------- configs, CLI

@pytest.mark.parametrize("source", ["multi30k", "parallel_files", "hub"])
def test_each_data_config_composes(source):
    cfg = data_config([f"data={source}"])
    assert isinstance(cfg, DataConfig) and cfg.source == source


def run_prepare_data(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """scripts/prepare_data.py run as ``__main__`` in this process: (exit status, out, err)."""
    monkeypatch.setattr(sys, "argv", [str(PREPARE_DATA), *args])
    try:
        runpy.run_path(str(PREPARE_DATA), run_name="__main__")
        status = 0
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("name", BAD)
def test_prepare_data_script_exits_non_zero_with_one_line(write_corpus, tmp_path, capsys,
                                                          monkeypatch, name):
    root, overrides = write_bad_case(write_corpus, name)
    monkeypatch.chdir(tmp_path)
    status, _, stderr = run_prepare_data(
        ["data=parallel_files", f"data.root={root}", "data.valid_split=valid",
         "data.test_splits=[test]", f"data.cache_dir={tmp_path / 'cache'}",
         *(f"data.{key}={value}" for key, value in overrides.items())], capsys, monkeypatch)
    assert status == 1
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert re.search(BAD[name][2], stderr), stderr
    assert [path.name for path in tmp_path.iterdir()] in ([], ["cache"]), "no outputs/"


def test_prepare_data_script_reports_dropped_pairs(write_corpus, tmp_path, capsys,
                                                   monkeypatch):
    root = write_corpus({**OTHER_SPLITS, "train": (["a", "", "b " * 30], ["x", "y", "z"])})
    status, stdout, _ = run_prepare_data(
        ["data=parallel_files", f"data.root={root}", "data.valid_split=valid",
         "data.test_splits=[test]", "data.max_len=20", f"data.cache_dir={tmp_path}"],
        capsys, monkeypatch)
    assert status == 0
    train_row = next(line for line in stdout.splitlines() if line.startswith("train "))
    assert train_row.split()[:6] == ["train", "3", "1", "2", "(1", "empty,"]
    assert "1 too long)" in train_row


def test_prepare_data_cli_offline_without_multi30k(tmp_path):
    # one real process: exit status and stderr as a shell sees them
    process = prepare_data_cli(["data.download=false", f"data.cache_dir={tmp_path}"], tmp_path)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 1
    assert stderr == ("error: Multi30k not found: data.root and MULTI30K_DIR are not set and "
                      "data.download=false; set MULTI30K_DIR or data.root to the folder of "
                      "the {split}.{lang}.gz files\n")
    assert "Traceback" not in stdout and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- Multi30k

@pytest.fixture(scope="module")
def multi30k_runs(multi30k_dir, tmp_path_factory) -> dict:
    """prepare_data.py on Multi30k, from cold and then from its cache, timed."""
    cwd = tmp_path_factory.mktemp("multi30k")
    runs = {}
    for name in ("cold", "cached"):
        start = time.perf_counter()
        process = prepare_data_cli([f"data.cache_dir={cwd / 'cache'}"], cwd, multi30k_dir)
        stdout, stderr = process.communicate(timeout=300)
        runs[name] = (process.returncode, stdout, stderr, time.perf_counter() - start)
    runs["cache_dir"] = cwd / "cache"
    print(f"\nprepare_data.py on Multi30k: cold {runs['cold'][3]:.1f} s, "
          f"cached {runs['cached'][3]:.1f} s")
    assert not (cwd / "outputs").exists()  # Hydra wrote no run folder
    return runs


@pytest.fixture(scope="module")
def multi30k(multi30k_runs, multi30k_dir):
    """Multi30k en-de as train.py composes it, from the cache prepare_data.py filled."""
    cfg = data_config([f"data.root={multi30k_dir}",
                       f"data.cache_dir={multi30k_runs['cache_dir']}"])
    return prepare_data(cfg, log=lambda _: None)


def test_prepare_data_cli_on_multi30k_cold_then_cached(multi30k_runs):
    for name, source in (("cold", "corpus"), ("cached", "cache")):
        returncode, stdout, stderr, _ = multi30k_runs[name]
        assert returncode == 0, stderr
        for split, pairs in (("train", 29000), ("val", 1014), ("test_2016_flickr", 1000),
                             ("test_2017_flickr", 1000)):
            lines = stdout.splitlines()
            table = lines[next(i for i, line in enumerate(lines) if line.startswith("split "))]
            row = next(line.split() for line in lines[lines.index(table):]
                       if line.startswith(f"{split} "))
            assert row[1:4] == [str(pairs), str(pairs), "0"] and row[-1] == source
            assert row[-3] == "8000"  # vocab
    assert "tokenizer: loaded" in multi30k_runs["cached"][1]
    assert multi30k_runs["cached"][3] < multi30k_runs["cold"][3]


def test_multi30k_splits_match_the_files(multi30k, multi30k_dir):
    assert {name: len(split) for name, split in multi30k.splits.items()} == {
        "train": 29000, "val": 1014, "test_2016_flickr": 1000, "test_2017_flickr": 1000}
    assert all(split.stats.cached for split in multi30k.splits.values())
    test = multi30k.splits["test_2016_flickr"]
    assert list(test.tgt_text) == read_lines(multi30k_dir / "test_2016_flickr.de.gz")
    assert multi30k.src_tokenizer is multi30k.tgt_tokenizer
    assert multi30k.src_tokenizer.vocab_size == 8000


def test_multi30k_val_round_trips(multi30k):
    tokenizer, val = multi30k.src_tokenizer, multi30k.splits["val"]
    for texts, ids in ((val.src_text, val.src_ids), (val.tgt_text, val.tgt_ids)):
        texts = list(texts)
        assert tokenizer.decode_batch(list(ids)) == [tokenizer.normalize(t) for t in texts]


def test_multi30k_batches_fit_max_tokens_and_cover_train_once(multi30k):
    train = multi30k.splits["train"]
    sampler = TokenBatchSampler.for_split(train, max_tokens=4096, seed=1)
    seen = np.zeros(len(train), dtype=int)
    for batch in iterate_batches(train, sampler, epoch=3):
        assert batch.src_tokens.numel() <= 4096 and batch.tgt_input.numel() <= 4096
        seen[batch.indices] += 1
    assert (seen == 1).all()
