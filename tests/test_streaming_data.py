"""Streaming preparation: memory bounded by the chunk, not the corpus; the ids of a streamed
preparation equal a line-by-line reference encoding; a preparation killed with SIGKILL
leaves nothing a later run trusts. Each preparation runs in its own process, which reports
its own peak RSS (``VmHWM`` of /proc/self/status)."""

from __future__ import annotations

import gzip
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from transformer.config import DataConfig
from transformer.data import prepare_data
from transformer.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent
CHUNK = 5_000  # small chunks: the memory a chunk takes is well below what is measured
SMALL, LARGE = 50_000, 100_000
EMPTY_EVERY = 997  # line i with i % EMPTY_EVERY == 5 has an empty target: dropped, counted
TRICKY_EVERY = 101  # line i with i % TRICKY_EVERY == 7 has a source that is not plain ASCII
TRICKY = ["Ein Mann läuft über's Feld", "„German“ quotes – and a dash", "a </s> b<s>c",
          "ﬁsh ＡＢＣ\u00a0nbsp", "file\x1cseparator", "e\u0301 ½ µ Ǆ", "日本語 😀",
          "tab\tand  runs"]

PREPARE = f"""
import sys
import transformer.data.corpora as corpora
corpora.CHUNK_PAIRS = {CHUNK}
from transformer.config import DataConfig
from transformer.data import prepare_data
cfg = DataConfig(source="parallel_files", root=sys.argv[1], cache_dir=sys.argv[2],
                 vocab_size=1000, tokenizer_sample=3000)
print(prepare_data(cfg, ["train"], log=lambda line: None).splits["train"].stats, flush=True)
# The peak of this program alone: getrusage's ru_maxrss would also count the image of the
# parent it was forked from (the pytest worker, ~1 GB late in a run), kept across exec.
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("peak_kib", hwm.split()[1], flush=True)
"""


def write_corpus(folder: Path, pairs: int) -> None:
    """``pairs`` short pairs from a 3000-word vocabulary; the source file gzipped."""
    rng = random.Random(pairs)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(4, 12)))
             for _ in range(3000)]
    src, tgt = [], []
    for i in range(pairs):
        src.append(" ".join(rng.choices(words, k=3)))
        if i % TRICKY_EVERY == 7:
            src[-1] += " " + TRICKY[i % len(TRICKY)]
        tgt.append("" if i % EMPTY_EVERY == 5 else " ".join(rng.choices(words, k=3)))
    folder.mkdir(parents=True)
    with gzip.open(folder / "train.en.gz", "wt", encoding="utf-8", compresslevel=1) as file:
        file.write("\n".join(src) + "\n")
    (folder / "train.de").write_text("\n".join(tgt) + "\n", encoding="utf-8")
    (folder / "valid.en").write_text("a\n")
    (folder / "valid.de").write_text("b\n")


def start(root: Path, cache: Path) -> subprocess.Popen:
    # one encoding thread and few malloc arenas: per-thread arenas would add MiB of noise
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "MALLOC_ARENA_MAX": "2"}
    return subprocess.Popen([sys.executable, "-c", PREPARE, str(root), str(cache)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_measured(root: Path, cache: Path) -> float:
    """Prepare ``root`` into ``cache`` in a fresh process; its peak RSS in MiB."""
    process = start(root, cache)
    stdout, stderr = process.communicate()
    assert process.returncode == 0, stderr
    assert "SplitStats(split='train'" in stdout
    return int(re.search(r"peak_kib (\d+)", stdout)[1]) / 1024


def split_dir(cache: Path) -> Path:
    (folder,) = [path.parent for path in cache.glob("*/train-*/stats.json")]
    return folder


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    base = tmp_path_factory.mktemp("streaming")
    roots = {pairs: base / f"corpus-{pairs}" for pairs in (SMALL, LARGE)}
    for pairs, root in roots.items():
        write_corpus(root, pairs)
    peaks = {pairs: run_measured(root, base / f"cache-{pairs}") for pairs, root in roots.items()}
    return base, roots, peaks


def test_peak_memory_does_not_grow_with_the_corpus(corpora):
    _, _, peaks = corpora
    # Holding the corpus, as reading files whole did, added 6.5 MiB for the 50,000 more
    # pairs (80 -> 86 MiB, measured): their lines, the lengths of every row as Python ints.
    # Streamed, a chunk of 5,000 pairs and the 3,000-pair BPE sample are all that is held,
    # whatever the corpus size (measured: +0.05 MiB).
    assert peaks[SMALL] < 500, peaks
    assert peaks[LARGE] - peaks[SMALL] < 4, peaks


def test_streamed_ids_equal_a_line_by_line_encoding(corpora):
    base, roots, _ = corpora
    data = prepare_data(DataConfig(source="parallel_files", root=str(roots[LARGE]),
                                   cache_dir=str(base / f"cache-{LARGE}"), vocab_size=1000,
                                   tokenizer_sample=3000), ["train"], log=lambda line: None)
    train = data.splits["train"]
    assert train.stats.cached
    empties = len(range(5, LARGE, EMPTY_EVERY))
    assert (train.stats.read, train.stats.kept) == (LARGE, LARGE - empties)
    assert train.stats.dropped == {"empty": empties, "too_long": 0}
    with gzip.open(roots[LARGE] / "train.en.gz", "rt", encoding="utf-8") as file:
        src = file.read().split("\n")[:-1]  # not splitlines: it also splits at \x1c
    tgt = (roots[LARGE] / "train.de").read_text(encoding="utf-8").split("\n")[:-1]
    kept = [i for i in range(LARGE) if i % EMPTY_EVERY != 5]
    reference = Tokenizer.from_file(data.cache_dir / "tokenizer.json")
    for row in random.Random(0).sample(range(len(kept)), 300) + [0, len(kept) - 1]:
        assert train.src_ids[row] == reference.encode(src[kept[row]])
        assert train.tgt_ids[row] == reference.encode(tgt[kept[row]])
        assert train.src_text[row] == src[kept[row]]
    # every row of the first 20,000, the tricky sources among them, sentence by sentence
    first = kept[:20_000]
    assert train.src_ids[:len(first)] == reference.encode_batch([src[i] for i in first])
    assert train.tgt_ids[:len(first)] == reference.encode_batch([tgt[i] for i in first])


def test_a_killed_preparation_leaves_nothing_trusted(corpora):
    base, roots, _ = corpora
    cache = base / "cache-killed"
    process = start(roots[LARGE], cache)
    deadline = time.monotonic() + 120
    while not any(path.stat().st_size for path in cache.glob("*/.train-*/src_ids.bin")):
        assert process.poll() is None and time.monotonic() < deadline, "never got to encoding"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not list(cache.glob("*/train-*/stats.json"))  # only a temporary folder, unused
    assert run_measured(roots[LARGE], cache) > 0
    finished, reference = split_dir(cache), split_dir(base / f"cache-{LARGE}")
    assert finished.name == reference.name
    for name in ("src_ids", "tgt_ids", "src_text", "tgt_text"):
        assert (finished / f"{name}.bin").read_bytes() == (reference / f"{name}.bin").read_bytes()
        np.testing.assert_array_equal(np.load(finished / f"{name}.idx.npy"),
                                      np.load(reference / f"{name}.idx.npy"))
