"""Corpus-scale translation: a source file of any size, streamed in chunks, resumable.

    python evaluate.py checkpoint=PATH mode=generate src_file=big.en output_file=big.de

The source (plain or .gz UTF-8, one sentence a line) is read ``chunk_lines`` lines at a
time, never whole: each chunk is translated by ``translation.translate_nbest`` (sorted by length,
batched by ``batch_tokens``, the same beam and length options as the other modes) and
its translations are appended to ``output_file`` in input order, one line each.

Resuming. After each chunk the output file is flushed and fsync'ed, then the sidecar
``output_file.progress.json`` is replaced (written aside, fsync'ed, renamed): it records
the input lines done, the output bytes that hold them, and a fingerprint of the input
(path, size, modification time), the checkpoints and the settings that change the
translations. Killed at any point and started again with the same command, a run cuts
the output back to the recorded bytes (a chunk written but not recorded goes) and goes
on at the next chunk. Chunks always start at multiples of ``chunk_lines``, so each is
batched as in an uninterrupted run, and the final file is the same byte for byte (on the
same device). An output file whose fingerprint differs, or that exists without a sidecar,
is refused (one line, exit 2) unless ``overwrite=true``. A finished run keeps its sidecar:
the same command again finds nothing left to do. A second run on an output file that a
run is writing stops at once (an ``flock`` on it).

The output is committed by bytes, counted in input lines: a chunk may write any number of
lines per input line. That is the hook for n-best output: a ``translate_chunk`` that
writes one JSON object per hypothesis (JSON lines) needs no change here.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from transformer.config import ConfigError, EvalConfig
from transformer.data import DataError

try:
    import fcntl
except ImportError:  # not a POSIX system
    fcntl = None

log = logging.getLogger("transformer")

# translate_chunk(lines, first_line, on_batch) -> the output text of those lines
ChunkTranslator = Callable[[list[str], int, Callable[[int], None]], str]

# Keys that say where things go or how they run, not what the translations are: left out
# of the fingerprint (the source and checkpoints enter it by their file identity).
PLACE_KEYS = ("checkpoint", "ensemble", "src_file", "output_file", "overwrite", "mode",
              "splits", "ref_file", "device", "precision", "data_root", "output_dir",
              "scores_file", "trust_modules")


@dataclass
class Committed:
    """What the sidecar records: ``lines`` input lines are translated, in the first
    ``bytes`` bytes of the output file, for this ``fingerprint``."""

    lines: int
    bytes: int
    fingerprint: dict[str, Any]


def generate(cfg: EvalConfig | DictConfig) -> int:
    """Translate ``cfg.src_file`` into ``cfg.output_file`` (see the module docstring);
    -> the number of lines translated in all."""
    from transformer.precision import Precision, resolve_device
    from transformer.search_options import check_search_options

    check_search_options(cfg)
    check_backend(cfg)
    src_path, out_path = checked_paths(cfg)
    device = resolve_device(cfg.device)
    precision = Precision.resolve(cfg.precision, device, training=False).name
    fingerprint = make_fingerprint(cfg, precision)
    committed = resume_point(out_path, fingerprint, cfg.overwrite)  # before the slow load
    if cfg.backend == "ctranslate2":
        translate_chunk = ctranslate2_translator(cfg, device)
    else:
        translate_chunk = torch_translator(cfg, device, precision)
    total = stream_translations(src_path, out_path, translate_chunk, cfg.chunk_lines, committed)
    print(f"{src_path.name}: {total} translations -> {out_path}")
    return total


def torch_translator(cfg: EvalConfig | DictConfig, device: torch.device, precision: str
                     ) -> ChunkTranslator:
    """``backend=torch``: our searches (``translation.translate_nbest``) with every option."""
    from transformer.data.multilingual import tag_sources, target_tag
    from transformer.evaluation import load_models
    from transformer.search_options import json_lines, search_kwargs, wants_json
    from transformer.translation import translate_nbest

    model, tokenizer, train_cfg = load_models([cfg.checkpoint, *cfg.ensemble],
                                              cfg.average_last, device, cfg.trust_modules)
    tag = target_tag(train_cfg.data, cfg.tgt_lang)  # a multilingual model's <2de>

    def translate_chunk(lines: list[str], first_line: int, on_batch: Callable[[int], None]
                        ) -> str:
        """The chunk's output: a line a source line, or with ``nbest`` / ``token_scores``
        the JSON lines of its hypotheses (``id``: the 0-based source line)."""
        if tag is not None:
            lines = tag_sources(lines, tag)
        hypotheses = translate_nbest(model, tokenizer, lines, lenpen=cfg.lenpen,
                                     max_tokens=cfg.batch_tokens, max_len_a=cfg.max_len_a,
                                     max_len_b=cfg.max_len_b, min_len=cfg.min_len,
                                     precision=precision, first_line=first_line,
                                     prefixes=cfg.prefix, on_batch=on_batch,
                                     **search_kwargs(cfg))
        if wants_json(cfg):
            return "".join(line + "\n" for line in json_lines(
                hypotheses, tokenizer, cfg.token_scores, first_id=first_line - 1))
        return "".join((n_best[0].text or "") + "\n" for n_best in hypotheses)

    return translate_chunk


# What backend=ctranslate2 leaves to backend=torch: key -> its default.
TORCH_ONLY = {"ensemble": [], "search": "beam", "nbest": 1, "token_scores": False,
              "prefix": None, "no_repeat_ngram_size": 0}


def check_backend(cfg: EvalConfig | DictConfig) -> None:
    if cfg.backend not in ("torch", "ctranslate2"):
        raise ConfigError(f"backend={cfg.backend!r} is not one of ['torch', 'ctranslate2']")
    if cfg.backend == "torch":
        if cfg.compute_type != "default":
            raise ConfigError(f"compute_type={cfg.compute_type} needs backend=ctranslate2")
        return
    for key, default in TORCH_ONLY.items():
        value = getattr(cfg, key)
        if value != default and not (key == "search" and value == "greedy"):
            raise ConfigError(f"{key}={value} needs backend=torch (backend=ctranslate2 "
                              "decodes one model, or an average_last, with beam or greedy "
                              "search)")


def ctranslate2_translator(cfg: EvalConfig | DictConfig, device: torch.device
                           ) -> ChunkTranslator:
    """``backend=ctranslate2``: the model (a checkpoint, or an ``average_last``) exported to
    CTranslate2 (transformer/ctranslate2_export.py) in a temporary folder, loaded with
    ``compute_type`` (default: the weights' float32; int8 quantizes them) and as many
    threads as torch has, and decoded by its beam search: fairseq's early stopping (a
    sentence ends once it has ``beam`` finished hypotheses), the same length penalty and
    limits as ours."""
    import tempfile

    from transformer.checkpoint import load_checkpoint
    from transformer.ctranslate2_export import (
        import_ctranslate2,
        load_ctranslate2,
        translate_ctranslate2,
        vocabularies,
        write_ctranslate2,
    )
    from transformer.data.multilingual import tag_sources, target_tag
    from transformer.evaluation import read_state

    import_ctranslate2()  # missing: one line before the slow load
    state, name = read_state(cfg.checkpoint, cfg.average_last)
    model, tokenizer, train_cfg = load_checkpoint(state, "cpu", name, cfg.trust_modules)
    src_vocab, tgt_vocab = vocabularies(state["tokenizer"])
    with tempfile.TemporaryDirectory(prefix="ct2-generate-") as folder:
        # The Translator holds the weights in memory: the folder may go.
        translator, _, _ = load_ctranslate2(
            write_ctranslate2(state, model, train_cfg, Path(folder) / "model"), device.type,
            cfg.compute_type, threads=torch.get_num_threads())
    tag = target_tag(train_cfg.data, cfg.tgt_lang)
    beam = 1 if cfg.search == "greedy" else cfg.beam
    max_len = model.max_len
    del state, model

    def translate_chunk(lines: list[str], first_line: int, on_batch: Callable[[int], None]
                        ) -> str:
        if tag is not None:
            lines = tag_sources(lines, tag)
        tokens = [[src_vocab[i] for i in ids] for ids in tokenizer.encode_batch(lines)]
        ids = translate_ctranslate2(translator, tokens, tgt_vocab, beam=beam,
                                    lenpen=cfg.lenpen, max_len_a=cfg.max_len_a,
                                    max_len_b=cfg.max_len_b, min_len=cfg.min_len,
                                    max_len=max_len, max_batch_size=cfg.batch_tokens,
                                    batch_type="tokens", on_batch=on_batch)
        return "".join(text + "\n" for text in tokenizer.decode_batch(ids))

    return translate_chunk


def checked_paths(cfg: EvalConfig | DictConfig) -> tuple[Path, Path]:
    if not cfg.src_file or not cfg.output_file:
        raise ConfigError("mode=generate needs src_file=PATH and output_file=PATH")
    if cfg.ref_file:
        raise ConfigError("mode=generate does not score: drop ref_file, or use mode=files")
    if cfg.chunk_lines < 1:
        raise ConfigError(f"chunk_lines={cfg.chunk_lines} must be a positive number")
    src_path, out_path = Path(cfg.src_file), Path(cfg.output_file)
    if not src_path.is_file():
        raise DataError(f"src_file={src_path}: no such file")
    if out_path.resolve() == src_path.resolve():
        raise ConfigError(f"output_file={out_path} is the source file")
    return src_path, out_path


def progress_path(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".progress.json")


def file_identity(path: str | Path) -> dict[str, Any]:
    """Path, size and modification time: a file changed in place differs in one of them.
    A folder is named by its path only."""
    path = Path(path).resolve()
    if not path.is_file():
        return {"path": str(path)}
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def checkpoint_identity(path: str, average_last: int) -> dict[str, Any] | list[dict[str, Any]]:
    """The identity of what ``path`` gives the model: its file, or with ``average_last`` a
    run directory's newest checkpoints, the files averaged (a teacher run that saved more
    since, or was resumed, gives another model: its output must not be continued)."""
    if average_last > 1 and Path(path).is_dir():
        from transformer.checkpoint import last_checkpoints

        return [file_identity(p) for p in last_checkpoints(Path(path), average_last)]
    return file_identity(path)


def make_fingerprint(cfg: EvalConfig | DictConfig, precision: str) -> dict[str, Any]:
    """What the output depends on: the input file, the checkpoints, and every config key
    that is not a place (``PLACE_KEYS``), so that an option added to the search later
    counts without a change here; ``precision`` resolved (auto differs by device)."""
    values = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    settings = {key: value for key, value in values.items() if key not in PLACE_KEYS}
    return {"input": file_identity(cfg.src_file),
            "checkpoints": [checkpoint_identity(p, cfg.average_last)
                            for p in [cfg.checkpoint, *cfg.ensemble]],
            "settings": {**settings, "precision": precision}}


def first_difference(old: Any, new: Any, key: str = "") -> str:
    """``settings.beam: 5 -> 4``: the first place where two fingerprints differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for name in sorted(set(old) | set(new)):
            if old.get(name) != new.get(name):
                return first_difference(old.get(name), new.get(name), f"{key}{name}.")
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            if a != b:
                return first_difference(a, b, f"{key}{i}.")
    return f"{key.rstrip('.')}: {old} -> {new}"


def resume_point(out_path: Path, fingerprint: dict[str, Any], overwrite: bool) -> Committed:
    """Where an existing output file goes on from: nothing done when it is new or
    ``overwrite``; else what its sidecar records, if made from the same input with the same
    settings. Anything else raises DataError (exit 2)."""
    start = Committed(0, 0, fingerprint)
    sidecar = progress_path(out_path)
    # An empty output without a sidecar: killed between creating the two; nothing to lose.
    if overwrite or not out_path.exists() or (out_path.stat().st_size == 0
                                              and not sidecar.exists()):
        return start
    if not sidecar.is_file():
        raise DataError(f"output_file={out_path} exists and has no {sidecar.name}: not a run "
                        "to resume; overwrite=true replaces it")
    try:
        committed = Committed(**json.loads(sidecar.read_text()))
    except (ValueError, TypeError) as error:
        raise DataError(f"{sidecar}: not a progress file ({error}); overwrite=true starts "
                        "again") from None
    if committed.fingerprint != fingerprint:
        raise DataError(f"output_file={out_path} was made from another input or with other "
                        f"settings ({first_difference(committed.fingerprint, fingerprint)}); "
                        "overwrite=true starts again")
    if out_path.stat().st_size < committed.bytes:
        raise DataError(f"output_file={out_path} is shorter than {sidecar.name} records "
                        f"({out_path.stat().st_size} < {committed.bytes} bytes); "
                        "overwrite=true starts again")
    return committed


def save_progress(sidecar: Path, committed: Committed) -> None:
    """Replace the sidecar atomically: written aside, fsync'ed, renamed over the old one."""
    temporary = sidecar.with_name(sidecar.name + ".tmp")
    with open(temporary, "w") as file:
        json.dump(asdict(committed), file, indent=1)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, sidecar)


def open_source(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def count_lines(path: Path) -> int:
    """Lines in the file (a last one without ``\\n`` counts), in 1 MiB blocks."""
    count, last = 0, b"\n"
    with open_source(path) as file:
        while block := file.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def read_chunks(path: Path, chunk_lines: int, skip: int = 0) -> Iterator[tuple[int, list[str]]]:
    """(index of the first line, lines) for the chunks of ``chunk_lines`` lines after the
    first ``skip`` lines, split at ``\\n`` only as ``data.read_lines`` does. A line that is
    not UTF-8 becomes "" with a warning naming it (a corpus-scale run goes on)."""
    from transformer.evaluation import decoded_line

    chunk: list[str] = []
    with open_source(path) as file:
        for number, raw in enumerate(file, start=1):
            if number <= skip:
                continue
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
            chunk.append(decoded_line(raw, number))
            if len(chunk) == chunk_lines:
                yield number - chunk_lines, chunk
                chunk = []
    if chunk:
        yield number - len(chunk), chunk


def stream_translations(src_path: Path, out_path: Path, translate_chunk: ChunkTranslator,
                        chunk_lines: int, committed: Committed) -> int:
    """Translate ``src_path`` chunk by chunk from ``committed`` on, committing each chunk
    (output fsync'ed, then the sidecar); -> the source's line count."""
    try:
        total = count_lines(src_path)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"src_file={src_path}: cannot read it ({error})") from None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = progress_path(out_path)
    if committed.lines >= total and out_path.exists():
        log.info("%s: all %d lines are translated already", out_path, total)
        return total
    progress = ChunkProgress(total, committed.lines)
    with open(out_path, "ab") as out:  # appends; truncated only once locked
        lock(out, out_path)
        out.truncate(committed.bytes)  # a chunk written but not recorded goes
        save_progress(sidecar, committed)  # from here on the output is a run's, resumable
        try:
            for first, lines in read_chunks(src_path, chunk_lines, skip=committed.lines):
                text = translate_chunk(lines, first + 1, progress.advance)
                out.write(text.encode("utf-8"))
                out.flush()
                os.fsync(out.fileno())  # the lines are on disk before the sidecar says so
                committed = Committed(first + len(lines), out.tell(), committed.fingerprint)
                save_progress(sidecar, committed)
                progress.committed(committed.lines)
        finally:
            progress.close()
    return total


def lock(out: IO[bytes], out_path: Path) -> None:
    """One writer per output file: a second run on it stops (the kernel drops the lock
    when its holder dies, kill -9 included, so a killed run never blocks its resume)."""
    if fcntl is None:  # not a POSIX system: no lock
        return
    try:
        fcntl.flock(out, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise DataError(f"output_file={out_path} is being written by another run") from None


class ChunkProgress:
    """A tqdm bar (sentences/s, ETA) moved after each batch on a terminal; otherwise a log
    line after each chunk, with the rate of this session and the time left."""

    def __init__(self, total: int, done: int):
        self.total, self.start_done, self.start = total, done, time.perf_counter()
        self.bar = tqdm(total=total, initial=done, unit="sent", dynamic_ncols=True,
                        leave=False) if sys.stderr.isatty() else None

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def committed(self, done: int) -> None:
        if self.bar is not None:  # empty lines never reach a batch: set the count exactly
            self.bar.update(done - self.bar.n)
            return
        rate = (done - self.start_done) / max(time.perf_counter() - self.start, 1e-9)
        left = (self.total - done) / rate if rate > 0 else float("inf")
        log.info("%d/%d lines (%.1f%%) | %.1f sentences/s | %s left", done, self.total,
                 100 * done / self.total, rate, format_seconds(left))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_seconds(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
