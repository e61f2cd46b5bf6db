"""Shared fixtures: the real Multi30k files, and tiny parallel corpora written on the spot."""

from __future__ import annotations

import gzip
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from transformer.config import DataConfig

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """The README exports a relative ``MULTI30K_DIR``; tests start train.py and other
    commands in temporary folders, where a relative path names nothing. Make it absolute
    against the folder pytest was started in, before any test hands it on."""
    if os.environ.get("MULTI30K_DIR"):
        os.environ["MULTI30K_DIR"] = os.path.abspath(os.environ["MULTI30K_DIR"])


@pytest.fixture(scope="session")
def multi30k_dir() -> Path:
    """The Multi30k Task 1 files: ``$MULTI30K_DIR``, else ``../shared/data/multi30k`` beside
    the repository. Without them a test skips, except under ``CI=true``, where it fails."""
    path = Path(os.environ.get("MULTI30K_DIR") or REPO.parent / "shared/data/multi30k")
    if not (path / "train.en.gz").exists():
        message = f"the Multi30k files are not in {path}: set MULTI30K_DIR"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


CorpusWriter = Callable[..., Path]


@pytest.fixture(scope="session")
def write_corpus(tmp_path_factory: pytest.TempPathFactory) -> CorpusWriter:
    """``write_corpus({"train": (src_lines, tgt_lines), ...}, langs=("en", "de"), gz=False)``
    writes ``{split}.{lang}[.gz]`` files into a fresh folder and returns it. A line list may
    also be ``bytes``: the file's exact content."""

    def write(splits: dict[str, tuple[list[str] | bytes, list[str] | bytes]],
              langs: tuple[str, str] = ("en", "de"), gz: bool = False) -> Path:
        root = tmp_path_factory.mktemp("corpus")
        for split, sides in splits.items():
            for lang, lines in zip(langs, sides, strict=True):
                data = lines if isinstance(lines, bytes) else "".join(
                    f"{line}\n" for line in lines).encode()
                path = root / (f"{split}.{lang}.gz" if gz else f"{split}.{lang}")
                path.write_bytes(gzip.compress(data) if gz else data)
        return root

    return write


def make_toy_pairs(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` made-up English-German sentence pairs of 1 to 12 words."""
    rng = random.Random(seed)
    words = [("a", "ein"), ("man", "Mann"), ("dog", "Hund"), ("runs", "läuft"),
             ("red", "roter"), ("ball", "Ball"), ("on", "auf"), ("the", "dem"),
             ("grass", "Rasen"), ("two", "zwei"), ("children", "Kinder"), ("play", "spielen")]
    src, tgt = [], []
    for _ in range(n):
        chosen = rng.choices(words, k=rng.randint(1, 12))
        src.append(" ".join(en for en, _ in chosen) + ".")
        tgt.append(" ".join(de for _, de in chosen) + ".")
    return src, tgt


@pytest.fixture(scope="session")
def toy_pairs() -> Callable[..., tuple[list[str], list[str]]]:
    """``toy_pairs(n, seed=0)``: n made-up English-German sentence pairs."""
    return make_toy_pairs


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures(...)``), as
    the train.py subprocesses there get with OMP_NUM_THREADS=1: the same float sums in every
    run of a comparison, and no oversubscription of CI's two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data cache folder shared by one module's tests."""
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def corpus(write_corpus: CorpusWriter) -> Path:
    """A toy parallel corpus, read-only: 300 train, 40 valid and 40 test pairs, plain files."""
    return write_corpus({"train": make_toy_pairs(300, seed=1), "valid": make_toy_pairs(40, seed=2),
                         "test": make_toy_pairs(40, seed=3)})


@pytest.fixture
def tiny_data_cfg(write_corpus: CorpusWriter, tmp_path: Path) -> DataConfig:
    """A ``parallel_files`` DataConfig over a toy corpus (300 train, 40 valid, 40 test pairs)
    with a 300-token vocabulary, cached in this test's tmp_path."""
    root = write_corpus({"train": make_toy_pairs(300, seed=1),
                         "valid": make_toy_pairs(40, seed=2), "test": make_toy_pairs(40, seed=3)})
    return DataConfig(source="parallel_files", root=str(root), valid_split="valid",
                      test_splits=["test"], vocab_size=300, max_len=64, max_tokens=256,
                      cache_dir=str(tmp_path / "cache"))
