"""Sequence-level distillation (experiment=multi30k_en_de_distill, ``data.train_tgt_file``):
a tiny teacher trained here translates its training source with ``mode=generate`` (an
ensemble of two of its checkpoints, from a .gz source), and a student trains on the
source and those translations through the usual data path. Checked against the teacher's
file itself: the student's targets are its lines, the cache follows the file, mixing
the references in counts as the weights say, and a file that does not fit fails in one line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import make_toy_pairs
from tests.test_evaluate import eval_config, hyp_file
from tests.test_train import REPO, compose_config
from transformer.checkpoint import read_checkpoint
from transformer.config import ConfigError, DataConfig, ExtraCorpusConfig, validate
from transformer.data import DataError, TokenBatchSampler, prepare_data, read_lines
from transformer.evaluation import evaluate, read_splits
from transformer.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")
TEACHER_STEPS = 80


@pytest.fixture(scope="module")
def corpus(write_corpus) -> Path:
    """200 toy train pairs, 20 valid, 20 test, as .gz files (Multi30k's form)."""
    return write_corpus({"train": make_toy_pairs(200, seed=1), "valid": make_toy_pairs(20, 2),
                         "test": make_toy_pairs(20, 3)}, gz=True)


def run_overrides(corpus: Path, cache: Path, steps: int) -> list[str]:
    return ["debug=fast", "data=parallel_files", f"data.root={corpus}",
            "data.valid_split=valid", "data.test_splits=[test]", f"data.cache_dir={cache}",
            "data.vocab_size=300", f"trainer.max_steps={steps}",
            f"trainer.val_every_steps={steps}", f"trainer.save_every_steps={max(steps // 2, 1)}",
            "trainer.val_max_sentences=8", "optim.lr=3e-3", "logger=[]"]


@pytest.fixture(scope="module")
def teacher(corpus, cache, tmp_path_factory) -> Path:
    """A teacher run trained for a few seconds: outputs short, but its own."""
    run_dir = tmp_path_factory.mktemp("teacher")
    train(compose_config(run_overrides(corpus, cache, TEACHER_STEPS)), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def generated(corpus, teacher, tmp_path_factory) -> Path:
    """Step 1: the teacher (its last checkpoint with its middle one: an ensemble) translates
    train.en.gz with beam search into a folder of its own (the README: outputs/distill/)."""
    out = tmp_path_factory.mktemp("outputs") / "distill" / "train.de"
    checkpoints = teacher / "checkpoints"
    evaluate(eval_config(checkpoint=str(checkpoints / "checkpoint_last.pt"),
                         ensemble=[str(checkpoints / f"checkpoint_{TEACHER_STEPS // 2}.pt")],
                         mode="generate", src_file=str(corpus / "train.en.gz"),
                         output_file=str(out), beam=2, max_len_b=10, chunk_lines=64))
    return out


def student_data(corpus: Path, cache: Path, generated: Path | None, **overrides
                 ) -> DataConfig:
    """The student's data; ``generated=None``: the references' (the plain recipe's)."""
    return DataConfig(source="parallel_files", root=str(corpus), valid_split="valid",
                      test_splits=["test"], vocab_size=300, cache_dir=str(cache),
                      train_tgt_file=str(generated) if generated else None, **overrides)


def quiet(_: str) -> None:
    pass


def test_generate_takes_an_ensemble_and_a_gz_source_as_files_mode_does(corpus, teacher,
                                                                      generated, tmp_path):
    """One line per source line, in order, the same as mode=files with the same ensemble
    (the chunks are smaller than the file here: the same lines but for rare close calls)."""
    checkpoints = teacher / "checkpoints"
    evaluate(eval_config(checkpoint=str(checkpoints / "checkpoint_last.pt"),
                         ensemble=[str(checkpoints / f"checkpoint_{TEACHER_STEPS // 2}.pt")],
                         mode="files", src_file=str(corpus / "train.en.gz"),
                         output_dir=str(tmp_path), beam=2, max_len_b=10))
    expected = read_lines(hyp_file(tmp_path, "train.en.gz"))
    lines = read_lines(generated)
    assert len(lines) == len(read_lines(corpus / "train.en.gz")) == 200
    assert sum(a == b for a, b in zip(lines, expected, strict=True)) >= 0.98 * len(lines)
    assert sum(bool(line.strip()) for line in lines) >= 150  # a teacher, not a blank


def test_the_student_trains_on_the_teachers_lines(corpus, cache, generated, tmp_path):
    """Step 2: train.py with data.train_tgt_file: the train split the student read holds
    the source lines and, as targets, exactly the teacher's lines, encoded by the
    student's tokenizer; val and test keep the references."""
    cfg = compose_config([*run_overrides(corpus, cache, 2), f"data.train_tgt_file={generated}"])
    train(cfg, tmp_path / "student")
    data = prepare_data(OmegaConf.to_object(cfg.data), log=quiet)
    split = data.splits["train"]
    assert split.stats.cached  # what the student was trained on, read again
    kept = [(src, tgt) for src, tgt in zip(read_lines(corpus / "train.en.gz"),
                                           read_lines(generated), strict=True) if tgt.strip()]
    assert [split.tgt_text[i] for i in range(len(split))] == [tgt for _, tgt in kept]
    assert [split.src_text[i] for i in range(len(split))] == [src for src, _ in kept]
    assert [list(split.tgt_ids[i]) for i in range(len(split))] == \
        [data.tgt_tokenizer.encode(tgt) for _, tgt in kept]
    references = read_lines(corpus / "valid.de.gz")
    assert [data.splits["valid"].tgt_text[i] for i in range(20)] == references
    state = read_checkpoint(tmp_path / "student" / "checkpoints" / "checkpoint_last.pt")
    assert state["step"] == 2 and state["config"]["data"]["train_tgt_file"] == str(generated)


def test_a_new_translation_is_encoded_again(corpus, generated, tmp_path):
    """No stale cache: the file replaced by another of the same size (its lines reversed)
    gives another key, and the split holds the new lines; the references have a key of
    their own."""
    own = tmp_path / "distill" / "train.de"  # a copy: other tests read the teacher's file
    own.parent.mkdir()
    own.write_bytes(generated.read_bytes())
    first = prepare_data(student_data(corpus, tmp_path, own), log=quiet)
    replaced = tmp_path / "train.de"
    replaced.write_text("".join(f"{line}\n" for line in reversed(read_lines(own))))
    os.replace(replaced, own)  # the same path, as a second generation leaves it
    second = prepare_data(student_data(corpus, tmp_path, own), log=quiet)
    plain = prepare_data(student_data(corpus, tmp_path, None), log=quiet)
    assert len({first.cache_dir, second.cache_dir, plain.cache_dir}) == 3
    split = second.splits["train"]
    assert own.stat().st_size == generated.stat().st_size  # only the content differs
    assert not split.stats.cached
    assert [split.tgt_text[i] for i in range(len(split))] == \
        [line for line in reversed(read_lines(generated)) if line.strip()]


def test_references_mixed_in_count_as_their_weight(corpus, generated, tmp_path):
    """``data.extra_train`` with the reference corpus at weight 2: an epoch holds each
    teacher pair once and each reference pair twice."""
    cfg = student_data(corpus, tmp_path, generated,
                       extra_train=[ExtraCorpusConfig(root=str(corpus), weight=2)])
    data = prepare_data(cfg, log=quiet)
    split = data.splits["train"]
    teacher_lines = [line for line in read_lines(generated) if line.strip()]
    references = read_lines(corpus / "train.de.gz")
    assert len(split) == len(teacher_lines) + 2 * len(references)
    expected = Counter(teacher_lines)
    for _ in range(2):
        expected.update(references)
    assert Counter(split.tgt_text[i] for i in range(len(split))) == expected
    # The sampler's epoch: the teacher's pairs come first in the mix, then the copies.
    visits = Counter()
    for batch in TokenBatchSampler.for_split(split, 200, shuffle=True, seed=1).batches(epoch=0):
        visits.update("teacher" if i < len(teacher_lines) else "reference" for i in batch)
    assert visits == {"teacher": len(teacher_lines), "reference": 2 * len(references)}


def test_a_file_that_does_not_fit_fails_in_one_line(corpus, cache, generated, tmp_path):
    """Fewer lines than the source (a generation not finished) and a missing file: one
    line naming the file, exit 2, before any step; a relative path is read from the
    folder the command started in."""
    short = tmp_path / "short.de"
    short.write_text("".join(line + "\n" for line in read_lines(generated)[:150]))
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *run_overrides(corpus, cache, 2),
         "data.train_tgt_file=short.de", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
        text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert f"{corpus / 'train.en.gz'} has 200 lines, {short} has 150" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(DataError, match=r"^data\.train_tgt_file=\S*nothing\.de: no such file"):
        prepare_data(student_data(corpus, cache, tmp_path / "nothing.de"), log=quiet)
    with pytest.raises(DataError, match="not of data=hub"):
        prepare_data(DataConfig(source="hub", hub_name="x", train_tgt_file=str(short)),
                     log=quiet)


def test_several_directions_are_refused_by_name():
    with pytest.raises(ConfigError, match="data.pairs with data.train_tgt_file"):
        validate(compose_config(["experiment=multi30k_en_de_distill",
                                 "data.pairs=[en-de,en-fr]"]))


def test_the_recipe_is_the_plain_recipe_on_other_targets():
    """experiment=multi30k_en_de_distill changes the targets only: the same model,
    optimizer, schedule, trainer and test settings as multi30k_en_de."""
    plain = OmegaConf.to_container(compose_config(["experiment=multi30k_en_de"]))
    distill = OmegaConf.to_container(compose_config(["experiment=multi30k_en_de_distill"]))
    assert distill.pop("experiment") == "multi30k_en_de_distill"
    assert distill["data"].pop("train_tgt_file") == "outputs/distill/train.de"
    plain.pop("experiment")
    plain["data"].pop("train_tgt_file")
    assert distill == plain


def test_evaluating_a_student_does_not_need_the_teachers_file(corpus, tmp_path):
    """evaluate.py reads val/test only (the tokenizer is the checkpoint's): the file may
    be gone by then. Preparing data trains a tokenizer on the train split: it needs it."""
    gone = student_data(corpus, tmp_path, tmp_path / "gone.de")
    named = read_splits(gone, ["test"])
    assert named["test.en-de"] == (read_lines(corpus / "test.en.gz"),
                                   read_lines(corpus / "test.de.gz"))
    with pytest.raises(DataError, match="gone.de: no such file"):
        prepare_data(gone, splits=["valid"], log=quiet)
