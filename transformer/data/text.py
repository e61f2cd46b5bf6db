"""Reading parallel text files: plain or .gz UTF-8, one sentence a line.

Text files are read here, not with ``datasets``' ``text`` loader: that loader also ends a
line at a lone ``\\r``, which silently shifts one side against the other, and its UTF-8
errors do not say where. ``read_lines`` splits at ``\\n`` only (a ``\\r`` before it goes),
decodes strictly, and names the file and line of any byte that is not UTF-8.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from contextlib import ExitStack
from itertools import islice
from pathlib import Path
from typing import IO


class DataError(ValueError):
    """Data that cannot be used; the one-line message names the file, line, split or key."""


def read_parallel_lines(src_path: str | Path, tgt_path: str | Path
                        ) -> tuple[list[str], list[str]]:
    """The lines of two parallel files, which must have as many lines each."""
    src_lines, tgt_lines = read_lines(src_path), read_lines(tgt_path)
    if len(src_lines) != len(tgt_lines):
        raise DataError(f"line counts differ: {src_path} has {len(src_lines)} lines, "
                        f"{tgt_path} has {len(tgt_lines)}")
    return src_lines, tgt_lines


def iter_parallel_chunks(src_path: str | Path, tgt_path: str | Path, size: int
                         ) -> Iterator[tuple[list[str], list[str]]]:
    """The lines of two parallel files, ``size`` pairs at a time, read as they are needed:
    memory holds one chunk, whatever the files' size. Lines are split and decoded as in
    ``read_lines``; files of different line counts are an error once the shorter one ends
    (the chunks before it have been yielded by then)."""
    paths = Path(src_path), Path(tgt_path)
    with ExitStack() as stack:
        files = [stack.enter_context(_open(path)) for path in paths]
        readers = [_decoded_chunks(file, path, size)
                   for file, path in zip(files, paths, strict=True)]
        read = 0
        while True:
            chunks = [next(reader, []) for reader in readers]
            if len(chunks[0]) != len(chunks[1]):
                counts = [read + len(chunk) + sum(map(len, reader))
                          for chunk, reader in zip(chunks, readers, strict=True)]
                raise DataError(f"line counts differ: {src_path} has {counts[0]} lines, "
                                f"{tgt_path} has {counts[1]}")
            if not chunks[0]:
                return
            read += len(chunks[0])
            yield chunks[0], chunks[1]


def _open(path: Path) -> IO[bytes]:
    try:
        return gzip.open(path) if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115
    except OSError as error:
        raise DataError(f"{path}: cannot read it ({error.strerror or error})") from None


def _decoded_chunks(file: IO[bytes], path: Path, size: int) -> Iterator[list[str]]:
    """The lines of an open binary file, as ``read_lines`` gives them, ``size`` at a time
    (the last chunk shorter; none after it). Each chunk is decoded in one piece."""
    number = 0  # lines before this chunk
    try:
        while raw := list(islice(file, size)):  # binary files split at b"\n" only
            try:
                text = b"".join(raw).decode("utf-8")
            except UnicodeDecodeError:
                text = "\n".join(_decoded_lines(raw, path, number))  # names the line
            lines = text.split("\n")[:len(raw)]
            if number == 0:
                lines[0] = lines[0].removeprefix("\ufeff")
            if "\r" in text:  # one search of the chunk; most files have no \r at all
                lines = [line.removesuffix("\r") for line in lines]
            number += len(raw)
            yield lines
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DataError(f"{path}: not a readable gzip file ({error})") from None
    except OSError as error:
        if path.suffix == ".gz":
            raise DataError(f"{path}: not a readable gzip file ({error})") from None
        raise DataError(f"{path}: cannot read it ({error.strerror or error})") from None


def _decoded_lines(raw: list[bytes], path: Path, before: int) -> Iterator[str]:
    """The lines ``raw`` (after ``before`` others) decoded one by one, to say which line
    holds bytes that are not UTF-8."""
    for number, line in enumerate(raw, before + 1):
        try:
            yield line.decode("utf-8").removesuffix("\n")
        except UnicodeDecodeError as error:
            raise DataError(f"{path}:{number}: bytes that are not UTF-8 "
                            f"({line[error.start:error.start + 4]!r})") from None


def read_lines(path: str | Path) -> list[str]:
    """The lines of a plain or .gz UTF-8 text file, split at ``\\n`` only, without the
    ``\\n`` or a ``\\r`` before it; a lone ``\\r`` stays inside its line."""
    path = Path(path)
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}:{line}: bytes that are not UTF-8 "
                        f"({data[error.start:error.start + 4]!r})") from None
    lines = text.removeprefix("\ufeff").split("\n")
    if lines[-1] == "":  # the newline that ends the last line opens no new one
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:  # no permission, a folder of that name, an I/O error
        raise DataError(f"{path}: cannot read it ({error.strerror or error})") from None
    if path.suffix != ".gz":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: not a readable gzip file ({error})") from None
