"""Reading parallel text files: plain or .gz UTF-8, one sentence a line.

Text files are read here, not with ``datasets``' ``text`` loader: that loader also ends a
line at a lone ``\\r``, which silently shifts one side against the other, and its UTF-8
errors do not say where. ``read_lines`` splits at ``\\n`` only (a ``\\r`` before it goes),
decodes strictly, and names the file and line of any byte that is not UTF-8.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path


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
