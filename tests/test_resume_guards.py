"""Resume guards and the run-directory lock, end to end on the CPU with the toy corpus.

A resume that changes what decides the data order (training data, batching, seed, world
size, gradient accumulation) stops with one line naming each change, old and new, unless
``trainer.reset_dataloader=true`` accepts it; the checkpoint's tokenizer is used whatever the
data cache and ``data.*`` say; an unchanged resume stays exact. Two trainers never share a
run directory, and two runs started in the same second never get the same default one."""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import make_toy_pairs
from tests.test_faults import REPO, LiveRun, assert_same_run, train_command
from tests.test_train import compose_config
from transformer.checkpoint import (
    CheckpointError,
    read_checkpoint,
    read_tokenizers,
    save_checkpoint,
)
from transformer.config import ConfigError, DataConfig
from transformer.data import prepare_data, tokenizer_hash
from transformer.distributed import reserve_stamp, run_stamp
from transformer.resume import reseeded
from transformer.run_lock import run_dir_lock
from transformer.tokenizer import Tokenizer
from transformer.trainer import train
from transformer.training import run as run_module

INTERRUPTED, FINAL = 8, 12  # the base run stops at step 8 (epoch 1, batch 2 of 6)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def overrides(corpus: Path, cache: Path, max_steps: int, *extra: str) -> list[str]:
    """A tiny model on the toy corpus (max_tokens 512: six batches an epoch), a checkpoint
    every 4 steps."""
    return ["debug=fast", "data=parallel_files", f"data.root={corpus}", f"data.cache_dir={cache}",
            f"trainer.max_steps={max_steps}", "trainer.val_every_steps=1000",
            "trainer.save_every_steps=4", "trainer.log_every_steps=2",
            "logger.attention_maps=false", *extra]


@pytest.fixture(scope="module")
def straight(corpus, cache, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight")
    train(compose_config(overrides(corpus, cache, FINAL)), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def base(corpus, cache, tmp_path_factory) -> Path:
    """The run stopped at step 8, which the tests resume (from a copy, or into a new run
    directory: this one stays as it is)."""
    run_dir = tmp_path_factory.mktemp("base")
    train(compose_config(overrides(corpus, cache, INTERRUPTED)), run_dir)
    return run_dir


def last_checkpoint(run_dir: Path) -> dict:
    return read_checkpoint(run_dir / "checkpoints" / "checkpoint_last.pt")


def copy_run(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "run", ignore=shutil.ignore_patterns(".lock")))


def refused(cfg_overrides: list[str], run_dir: Path) -> str:
    """The one-line message with which a resume into ``run_dir`` stops, before it writes."""
    with pytest.raises(CheckpointError) as error:
        train(compose_config(cfg_overrides), run_dir)
    message = str(error.value)
    assert "\n" not in message
    assert "trainer.reset_dataloader=true" in message, message
    assert not (run_dir / "checkpoints").exists()
    return message


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("change,named", [
    ("data.max_tokens=256", ["data.max_tokens: 512 -> 256"]),
    ("data.max_sentences=8", ["data.max_sentences: None -> 8"]),
    # Shorter pairs only: other pairs are dropped, so the training data changes too.
    ("data.max_len=10 data.allow_long_eval=true",
     ["data.max_len: 256 -> 10", "training data: 300 pairs, sha256 "]),
    ("trainer.seed=2", ["trainer.seed: 1 -> 2"]),
    ("trainer.grad_accum=2", ["trainer.grad_accum: 1 -> 2"]),
    ("trainer.overfit_batches=2", ["trainer.overfit_batches: 0 -> 2"]),
])
def test_a_changed_data_order_setting_is_refused_naming_old_and_new(change, named, base, corpus,
                                                                   cache, tmp_path):
    message = refused(overrides(corpus, cache, FINAL, *change.split(), f"trainer.resume={base}"),
                      tmp_path / "run")
    for part in named:
        assert part in message, message
    assert message.count("->") == len(named), message  # nothing else is named


def test_an_edited_corpus_is_refused_naming_the_training_data(base, corpus, cache, write_corpus,
                                                             tmp_path):
    src, tgt = make_toy_pairs(300, seed=1)
    tgt[7] = tgt[7].replace("Hund", "Mann")  # one word of one line, the same length
    edited = write_corpus({"train": (src, tgt), "valid": make_toy_pairs(40, seed=2)})
    message = refused(overrides(edited, cache, FINAL, f"trainer.resume={base}"),
                      tmp_path / "run")
    saved = last_checkpoint(base)["data_fingerprint"]["train_data"]
    assert saved.startswith("300 pairs, sha256 ")
    assert f"training data: {saved} -> 300 pairs, sha256 " in message, message
    assert message.count("->") == 1, message


def test_the_same_corpus_elsewhere_is_the_same_training_data(base, corpus, cache, tmp_path):
    """The fingerprint holds the ids, not the files' paths and dates: a copied corpus
    resumes."""
    moved = Path(shutil.copytree(corpus, tmp_path / "moved"))
    os.utime(moved / "train.en", (1, 1))
    train(compose_config(overrides(moved, cache, INTERRUPTED + 2, f"trainer.resume={base}")),
          tmp_path / "run")
    assert last_checkpoint(tmp_path / "run")["step"] == INTERRUPTED + 2


def fake_two_rank_checkpoint(base: Path, path: Path) -> None:
    """The base checkpoint as a two-rank job would have written it (an RNG state per rank)."""
    state = last_checkpoint(base)
    state["world_size"] = state["data_fingerprint"]["world_size"] = 2
    state["rng_per_rank"] = [state["rng"], state["rng"]]
    save_checkpoint(state, path)


def test_another_world_size_is_refused_or_reset_with_fresh_random_streams(base, corpus, cache,
                                                                          tmp_path):
    two_ranks = tmp_path / "two_ranks.pt"
    fake_two_rank_checkpoint(base, two_ranks)
    resume = overrides(corpus, cache, INTERRUPTED + 2, f"trainer.resume={two_ranks}")
    message = refused(resume, tmp_path / "refused")
    assert "world size (torchrun --nnodes x --nproc_per_node): 2 -> 1" in message, message
    assert message.count("->") == 1, message

    train(compose_config([*resume, "trainer.reset_dataloader=true"]), tmp_path / "run")
    state = last_checkpoint(tmp_path / "run")
    assert state["step"] == INTERRUPTED + 2 and state["world_size"] == 1
    assert state["data_fingerprint"]["world_size"] == 1
    # The saved streams were two ranks'; this rank's are seeded anew for (seed, step, rank).
    assert torch.initial_seed() == reseeded(1, INTERRUPTED, 0)


def test_train_py_exits_2_with_one_line_and_the_checkpoints_unchanged(base, corpus, cache,
                                                                      tmp_path):
    run_dir = copy_run(base, tmp_path)
    before = (run_dir / "checkpoints" / "checkpoint_last.pt").read_bytes()
    with LiveRun(train_command(overrides(corpus, cache, FINAL, "trainer.seed=5",
                                         "trainer.resume=auto", f"hydra.run.dir={run_dir}")),
                 tmp_path) as run:
        log = run.finish()
    assert run.process.returncode == 2, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "trainer.seed: 1 -> 5" in errors[0], log[-3000:]
    assert "Traceback" not in log
    assert (run_dir / "checkpoints" / "checkpoint_last.pt").read_bytes() == before


# ----------------------------------------------------------------------------- accepted

def test_reset_dataloader_restarts_the_epoch_under_the_new_settings(base, corpus, cache,
                                                                    tmp_path, caplog):
    run_dir = copy_run(base, tmp_path)
    saved = last_checkpoint(run_dir)["train_state"]
    assert (saved["epoch"], saved["batch_in_epoch"]) == (1, 2)
    new = overrides(corpus, cache, INTERRUPTED + 2, "data.max_tokens=256", "trainer.resume=auto")
    with caplog.at_level(logging.INFO, logger="transformer"):
        train(compose_config([*new, "trainer.reset_dataloader=true"]), run_dir)
    assert ("trainer.reset_dataloader=true: data.max_tokens: 512 -> 256; epoch 1 restarts at "
            "its first batch (the checkpoint was at batch 2 of it)") in caplog.text
    assert "resumed at step 8 (epoch 1, batch 0)" in caplog.text
    state = last_checkpoint(run_dir)
    # Two steps from the epoch's start (an exact resume would stand at batch 4), same epoch.
    assert (state["train_state"]["epoch"], state["train_state"]["batch_in_epoch"]) == (1, 2)
    assert state["data_fingerprint"]["data.max_tokens"] == 256
    # The new settings are the run's now: the next resume with them is not refused, and
    # continues exactly where this one stopped.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="transformer"):
        train(compose_config(overrides(corpus, cache, INTERRUPTED + 4, "data.max_tokens=256",
                                       "trainer.resume=auto")), run_dir)
    assert "resumed at step 10 (epoch 1, batch 2)" in caplog.text


def test_an_unchanged_resume_is_exact_even_with_reset_dataloader(base, straight, corpus, cache,
                                                                 tmp_path):
    run_dir = copy_run(base, tmp_path)
    train(compose_config(overrides(corpus, cache, FINAL, "trainer.resume=auto",
                                   "trainer.reset_dataloader=true")), run_dir)
    assert_same_run(run_dir, straight)


def test_a_checkpoint_of_older_code_resumes_with_a_warning(base, straight, corpus, cache,
                                                          tmp_path, caplog):
    run_dir = copy_run(base, tmp_path)
    for path in (run_dir / "checkpoints").glob("*.pt"):  # as written before fingerprints
        state = read_checkpoint(path)
        del state["data_fingerprint"]
        save_checkpoint(state, path)
    with caplog.at_level(logging.WARNING, logger="transformer"):
        train(compose_config(overrides(corpus, cache, FINAL, "trainer.resume=auto")), run_dir)
    assert "holds no data fingerprint" in caplog.text
    assert "cannot be checked" in caplog.text
    assert_same_run(run_dir, straight)


# ----------------------------------------------------------------------------- tokenizer

def test_the_stored_tokenizer_is_used_when_the_cache_is_lost_and_vocab_size_changed(
        base, straight, corpus, tmp_path, caplog):
    """A new cache folder and another data.vocab_size, which would train another tokenizer:
    the resumed run still encodes with the checkpoint's and ends as the uninterrupted run."""
    run_dir = copy_run(base, tmp_path)
    with caplog.at_level(logging.WARNING, logger="transformer"):
        train(compose_config(overrides(corpus, tmp_path / "new_cache", FINAL, "data.vocab_size=200",
                                       "trainer.resume=auto")), run_dir)
    assert "data.vocab_size=200 does not apply to a resumed run" in caplog.text
    assert last_checkpoint(run_dir)["tokenizer"] == last_checkpoint(base)["tokenizer"]
    assert last_checkpoint(run_dir)["config"]["data"]["vocab_size"] == 500  # the run's
    assert_same_run(run_dir, straight)


def test_the_stored_tokenizer_encodes_an_edited_corpus_after_a_reset(base, corpus, write_corpus,
                                                                     tmp_path, monkeypatch):
    """The corpus gained pairs with new words and the cache is gone: a tokenizer trained now
    would differ. The run resumed with reset_dataloader encodes the new corpus with the
    checkpoint's tokenizer."""
    src, tgt = make_toy_pairs(300, seed=1)
    src, tgt = src + ["a cat sleeps."] * 40, tgt + ["eine Katze schläft."] * 40
    grown = write_corpus({"train": (src, tgt), "valid": make_toy_pairs(40, seed=2)})
    stored = read_tokenizers(last_checkpoint(base)["tokenizer"])
    retrained = prepare_data(DataConfig(source="parallel_files", root=str(grown), vocab_size=500,
                                        valid_split="valid", cache_dir=str(tmp_path / "other")),
                             splits=["train"], log=lambda _: None)
    assert tokenizer_hash((retrained.src_tokenizer, retrained.tgt_tokenizer)) != \
        tokenizer_hash(stored)  # else this test could not fail
    prepared = []
    monkeypatch.setattr(run_module, "prepare_data",
                        lambda *args, **kwargs: prepared.append(prepare_data(*args, **kwargs))
                        or prepared[-1])
    train(compose_config(overrides(grown, tmp_path / "new_cache", INTERRUPTED + 2,
                                   f"trainer.resume={base}", "trainer.reset_dataloader=true")),
          tmp_path / "run")
    data = prepared[0]
    assert data.src_tokenizer.to_str() == stored[0].to_str()
    split = data.splits["train"]
    assert list(split.src_ids) == stored[0].encode_batch(src)
    assert list(split.tgt_ids) == stored[1].encode_batch(tgt)
    assert last_checkpoint(tmp_path / "run")["tokenizer"] == last_checkpoint(base)["tokenizer"]


def test_a_split_cached_with_another_tokenizer_is_never_read_with_this_one(tiny_data_cfg,
                                                                           toy_pairs):
    """The cached ids of a folder whose tokenizer file was replaced (by hand, or retrained
    after it was deleted) are encoded anew, with the tokenizer now in use, whether it is
    loaded from the folder or given (a resumed run's)."""
    first = prepare_data(tiny_data_cfg, splits=["train"], log=lambda _: None)
    other = Tokenizer.train(sum(toy_pairs(50, seed=9), []), vocab_size=280)
    assert other.to_str() != first.src_tokenizer.to_str()
    other.save(first.cache_dir / "tokenizer.json")
    for given in (None, (other, other)):
        data = prepare_data(tiny_data_cfg, splits=["train"], log=lambda _: None,
                            given_tokenizers=given)
        assert data.cache_dir == first.cache_dir  # the same tokenizer: the same folder
        split = data.splits["train"]
        assert list(split.src_ids) == other.encode_batch(list(split.src_text))
        assert list(split.tgt_ids) == other.encode_batch(list(split.tgt_text))
        assert list(split.src_ids) != list(first.splits["train"].src_ids)


def test_a_resumed_run_reuses_its_first_start_s_cache(base, corpus, cache, tmp_path, caplog):
    """Given the tokenizer that its first start trained and cached, a resumed run reads
    that start's encoded splits: nothing is encoded again."""
    with caplog.at_level(logging.INFO, logger="transformer"):
        train(compose_config(overrides(corpus, cache, INTERRUPTED + 1, f"trainer.resume={base}")),
              tmp_path / "run")
    found = re.search(r"train: 300 of 300 pairs kept, dropped 0; from cache, (\S+)/train-",
                      caplog.text)
    assert found, caplog.text
    assert (Path(found.group(1)) / "tokenizer.json").exists()  # the trained tokenizer's folder


# ----------------------------------------------------------------------------- the lock

def test_a_locked_run_directory_stops_a_second_trainer_naming_the_holder(corpus, cache,
                                                                         tmp_path):
    run_dir = tmp_path / "run"
    holder = re.escape(f"in use by another trainer (pid {os.getpid()} on host "
                       f"{socket.gethostname()}, since ")
    with run_dir_lock(run_dir), pytest.raises(ConfigError, match=holder):
        train(compose_config(overrides(corpus, cache, 2)), run_dir)
    assert not (run_dir / "checkpoints").exists()
    train(compose_config(overrides(corpus, cache, 2)), run_dir)  # released: it runs
    with run_dir_lock(run_dir):  # and releases the lock when it ends
        pass


# A process that holds a run directory's lock, as a trainer does, until it is killed.
HOLDER = """
import sys, time
from transformer.run_lock import run_dir_lock

with run_dir_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_train_py_on_a_locked_run_directory_exits_2_and_a_kill_9_frees_it(corpus, cache,
                                                                           tmp_path):
    """A second train.py on a directory another process holds exits 2 at once, naming that
    process's pid; once the holder is killed (-9), the directory trains: no stale lock."""
    run_dir = tmp_path / "run"
    with LiveRun([sys.executable, "-c", HOLDER, str(run_dir)], REPO) as holder:
        holder.wait_for("locked")
        second = subprocess.run(
            train_command(overrides(corpus, cache, 2, f"hydra.run.dir={run_dir}")),
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert holder.process.poll() is None  # still holding it
        holder.process.kill()
        holder.finish()
    assert holder.process.returncode == -signal.SIGKILL
    assert second.returncode == 2, second.stderr[-3000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, second.stderr[-3000:]
    assert f"is in use by another trainer (pid {holder.process.pid} on host " in errors[0]
    assert "Traceback" not in second.stderr
    assert not (run_dir / "checkpoints").exists()
    train(compose_config(overrides(corpus, cache, 2)), run_dir)
    assert last_checkpoint(run_dir)["step"] == 2


# ----------------------------------------------------------------------------- run stamps

def test_two_runs_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    stamp = "2026-11-26/10-00-00"
    assert reserve_stamp(tmp_path, stamp) == stamp
    assert reserve_stamp(tmp_path, stamp) == f"{stamp}-1"
    # Processes racing for one name: mkdir lets exactly one take each.
    with multiprocessing.get_context("fork").Pool(4) as pool:
        names = pool.starmap(reserve_stamp, [(tmp_path / "race", stamp)] * 8)
    assert sorted(names) == sorted([stamp, *(f"{stamp}-{n}" for n in range(1, 8))])
    # The resolver: one reserved name per process, however often Hydra resolves it.
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    root = str(tmp_path / "outputs")
    assert run_stamp(root) == run_stamp(root) and (Path(root) / run_stamp(root)).is_dir()
    # torchrun ranks agree on a name, so none reserves one of its own.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "1234")
    assert run_stamp(str(tmp_path / "elsewhere")) == "torchrun/1234"
    assert not (tmp_path / "elsewhere").exists()
