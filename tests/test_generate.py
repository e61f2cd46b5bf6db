"""mode=generate (transformer/generate.py): streamed, chunked and resumable translation of
a file, on a tiny checkpoint built here (random weights: deterministic on one thread)."""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from tests.test_evaluate import REPO, eval_config, hyp_file, make_checkpoint
from transformer.config import ConfigError
from transformer.data import DataError, read_lines
from transformer.evaluation import evaluate
from transformer.generate import (
    Committed,
    count_lines,
    progress_path,
    read_chunks,
    resume_point,
    save_progress,
    stream_translations,
)

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = ["a", "man", "dog", "runs", "red", "ball", "on", "the", "grass", "two", "children",
         "play"]


def write_source(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` short lines of toy words, a few of them empty."""
    rng = random.Random(seed)
    lines = ["" if rng.random() < 0.01 else " ".join(rng.choices(WORDS, k=rng.randint(1, 8)))
             for _ in range(n)]
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("generate") / "checkpoint.pt")


def generate_config(checkpoint: Path, src: Path, out: Path, **overrides):
    return eval_config(checkpoint=str(checkpoint), mode="generate", src_file=str(src),
                       output_file=str(out), **overrides)


def test_one_chunk_equals_files_mode_and_small_chunks_agree(checkpoint, tmp_path):
    """The same lines in the same order as mode=files, byte for byte when one chunk holds
    the file (the same batches); with small chunks (other batches, other float sums)
    at least 99% of the lines the same."""
    src = write_source(tmp_path / "in.en", 1200)
    evaluate(eval_config(checkpoint=str(checkpoint), mode="files", src_file=str(src),
                         output_dir=str(tmp_path / "files")))
    expected = hyp_file(tmp_path / "files", "in.en").read_text()
    evaluate(generate_config(checkpoint, src, tmp_path / "one.de", chunk_lines=5000))
    assert (tmp_path / "one.de").read_text() == expected
    evaluate(generate_config(checkpoint, src, tmp_path / "small.de", chunk_lines=100))
    got, want = (tmp_path / "small.de").read_text().split("\n"), expected.split("\n")
    assert len(got) == len(want) == 1201
    assert sum(a == b for a, b in zip(got, want, strict=True)) >= 0.99 * len(want)
    assert json.loads(progress_path(tmp_path / "small.de").read_text())["lines"] == 1200


def run_cli(checkpoint: Path, src: Path, out: Path, *extra: str, wait: bool = True):
    command = [sys.executable, str(REPO / "evaluate.py"), f"checkpoint={checkpoint}",
               "mode=generate", f"src_file={src}", f"output_file={out}", "device=cpu",
               "beam=2", "max_len_b=5", "chunk_lines=150", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_killed_run_resumes_to_the_same_file(checkpoint, tmp_path):
    """SIGKILL after at least one committed chunk, the same command again: the file an
    uninterrupted run writes, byte for byte."""
    src = write_source(tmp_path / "in.en", 3000)
    assert run_cli(checkpoint, src, tmp_path / "whole.de").returncode == 0
    out = tmp_path / "killed.de"
    process = run_cli(checkpoint, src, out, wait=False)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if json.loads(progress_path(out).read_text())["lines"] >= 150:
                break
        except (OSError, ValueError):  # not written yet, or replaced just now
            pass
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = json.loads(progress_path(out).read_text())["lines"]
    assert 150 <= done < 3000
    resumed = run_cli(checkpoint, src, out)
    assert resumed.returncode == 0, resumed.stderr
    assert out.read_bytes() == (tmp_path / "whole.de").read_bytes()


def fake_translator(lines, first_line, on_batch):
    on_batch(len(lines))
    return "".join(f"{first_line + i}:{line.upper()}\n" for i, line in enumerate(lines))


def test_a_chunk_written_but_not_recorded_is_cut_back(tmp_path):
    """Killed between the output's fsync and the sidecar's rename (or mid-write): the
    bytes past the recorded ones go, and the chunk is translated again."""
    src = write_source(tmp_path / "in.en", 250)
    whole, out = tmp_path / "whole.de", tmp_path / "out.de"
    stream_translations(src, whole, fake_translator, 100, Committed(0, 0, {}))
    expected = whole.read_bytes()
    first_chunk = expected[:len(b"".join(expected.split(b"\n", 100)[:100])) + 100]
    assert first_chunk.count(b"\n") == 100
    out.write_bytes(first_chunk + b"101:HALF A CHUNK")
    stream_translations(src, out, fake_translator, 100, Committed(100, len(first_chunk), {}))
    assert out.read_bytes() == expected


def test_changed_input_or_settings_are_refused_in_one_line(checkpoint, tmp_path):
    src = write_source(tmp_path / "in.en", 300)
    out = tmp_path / "out.de"
    assert run_cli(checkpoint, src, out).returncode == 0
    write_source(src, 301)  # another input under the same name
    refused = run_cli(checkpoint, src, out)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and refused.stderr.startswith("error: ")
    assert "output_file=" in refused.stderr and "(input." in refused.stderr
    assert run_cli(checkpoint, src, out, "overwrite=true").returncode == 0
    assert out.read_text().count("\n") == 301
    fingerprint = json.loads(progress_path(out).read_text())["fingerprint"]
    with pytest.raises(DataError, match=r"settings\.beam: 2 -> 3"):
        resume_point(out, {**fingerprint, "settings": {**fingerprint["settings"], "beam": 3}},
                     overwrite=False)
    progress_path(out).unlink()
    with pytest.raises(DataError, match="no out.de.progress.json"):
        resume_point(out, fingerprint, overwrite=False)


def test_finished_run_again_does_nothing_and_bad_keys_fail(checkpoint, tmp_path):
    src = write_source(tmp_path / "in.en", 50)
    out = tmp_path / "out.de"
    evaluate(generate_config(checkpoint, src, out))
    before = out.stat().st_mtime_ns
    evaluate(generate_config(checkpoint, src, out))
    assert out.stat().st_mtime_ns == before
    with pytest.raises(ConfigError, match="output_file"):
        evaluate(eval_config(checkpoint=str(checkpoint), mode="generate", src_file=str(src)))
    with pytest.raises(ConfigError, match="chunk_lines=0"):
        evaluate(generate_config(checkpoint, src, out, chunk_lines=0))


def peak_python_memory(tmp_path: Path, n: int) -> int:
    src = write_source(tmp_path / f"in{n}.en", n)
    tracemalloc.start()
    try:
        stream_translations(src, tmp_path / f"out{n}.de", fake_translator, 1000,
                            Committed(0, 0, {}))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_file(tmp_path):
    """Peak Python allocations for 10x the lines stay within 1.5x (one chunk is held, not
    the file: holding 200k lines would take tens of MB)."""
    small, large = peak_python_memory(tmp_path, 20_000), peak_python_memory(tmp_path, 200_000)
    assert large < 1.5 * small + 200_000, (small, large)


def test_chunks_split_lines_as_read_lines_does(tmp_path):
    """Against data.read_lines: a byte order mark, \\r\\n, a lone \\r kept, an empty line,
    no final newline; and a .gz file gives the same chunks."""
    data = "\ufeffone\r\ntwo\rhalf\n\nthree\nfour".encode()
    plain, packed = tmp_path / "in.en", tmp_path / "in.en.gz"
    plain.write_bytes(data)
    packed.write_bytes(gzip.compress(data))
    for path in (plain, packed):
        chunks = list(read_chunks(path, 2))
        assert [first for first, _ in chunks] == [0, 2, 4]
        assert [line for _, lines in chunks for line in lines] == read_lines(plain)
        assert count_lines(path) == 5
        assert list(read_chunks(path, 2, skip=2)) == chunks[1:]


def test_a_second_run_on_the_same_output_stops(tmp_path):
    src = write_source(tmp_path / "in.en", 10)
    out = tmp_path / "out.de"
    out.write_bytes(b"")
    with open(out, "ab") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(DataError, match="being written by another run"):
            stream_translations(src, out, fake_translator, 5, Committed(0, 0, {}))


def test_nbest_and_search_options_reach_the_generated_file(checkpoint, tmp_path):
    """``nbest`` writes JSON lines (``id``: the source line, across chunks), and the other
    search options (greedy, sampling with its seed) decode as in mode=files."""
    src = write_source(tmp_path / "in.en", 120)
    evaluate(generate_config(checkpoint, src, tmp_path / "nbest.jsonl", chunk_lines=50,
                             nbest=2, beam=3))
    records = [json.loads(line) for line in (tmp_path / "nbest.jsonl").read_text().splitlines()]
    lines = src.read_text().splitlines()  # an empty line has one (empty) hypothesis
    assert [(r["id"], r["rank"]) for r in records] == [
        (i, rank) for i, line in enumerate(lines) for rank in range(2 if line else 1)]
    best = [r["hypothesis"] for r in records if r["rank"] == 0]
    evaluate(generate_config(checkpoint, src, tmp_path / "beam3.de", chunk_lines=50, beam=3))
    assert (tmp_path / "beam3.de").read_text() == "".join(text + "\n" for text in best)
    for search in ({"search": "greedy"}, {"search": "sample", "seed": 7}):
        evaluate(eval_config(checkpoint=str(checkpoint), mode="files", src_file=str(src),
                             output_dir=str(tmp_path / "files"), **search))
        evaluate(generate_config(checkpoint, src, tmp_path / f"{search['search']}.de",
                                 chunk_lines=500, **search))
        expected = next(p for p in (tmp_path / "files").glob(f"in.en.{search['search']}*.hyp"))
        assert (tmp_path / f"{search['search']}.de").read_text() == expected.read_text()


def test_a_run_directory_is_fingerprinted_by_the_checkpoints_it_averages(tmp_path):
    """With average_last, a teacher run that saved a newer checkpoint since (trained on, or
    resumed) is another model: its output file is refused, not continued."""
    from transformer.generate import make_fingerprint

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for step in (1, 2):
        make_checkpoint(run / "checkpoints" / f"checkpoint_{step}.pt", seed=step)
    src = write_source(tmp_path / "in.en", 5)
    cfg = generate_config(run, src, tmp_path / "out.de", average_last=2)
    before = make_fingerprint(cfg, "fp32")
    assert [p["path"] for p in before["checkpoints"][0]] == [
        str(run / "checkpoints" / f"checkpoint_{step}.pt") for step in (1, 2)]
    assert make_fingerprint(cfg, "fp32") == before
    make_checkpoint(run / "checkpoints" / "checkpoint_3.pt", seed=3)
    after = make_fingerprint(cfg, "fp32")
    out = tmp_path / "out.de"
    out.write_bytes(b"line\n")
    save_progress(progress_path(out), Committed(1, 5, before))  # one line done before
    with pytest.raises(DataError, match=r"other settings \(checkpoints\.0\.0\."):
        resume_point(out, after, overwrite=False)
