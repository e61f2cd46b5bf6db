"""One trainer per run directory.

Two trainers on one run directory would each write ``checkpoint_last.pt`` over the other's,
and each one's pruning would delete the other's files. So a trainer holds an advisory lock
on ``<run_dir>/.lock`` (``fcntl.flock``) while it runs, and a second one stops at once,
naming the holder. The kernel drops the lock when the holder's process ends, however it
ends (kill -9 and crashes included), so a dead run never leaves a lock that blocks its
resume; the file itself stays, with the last holder's pid and host. Under torchrun one rank
(rank 0) locks for the whole job: all ranks share the directory.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from transformer.config import ConfigError

log = logging.getLogger("transformer")

try:
    import fcntl
except ImportError:  # not a POSIX system: no lock
    fcntl = None


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock while the block runs; a ConfigError naming the holder's pid
    and host if another process holds it."""
    handle = acquire(Path(run_dir))
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # closing the file drops the lock


def acquire(run_dir: Path):
    """The open ``.lock`` file, locked and holding this process's pid and host; None where
    the file system has no locks (a warning says so)."""
    path = run_dir / ".lock"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")  # noqa: SIM115 -- open while the run lasts
    except OSError as error:
        raise ConfigError(f"run directory {run_dir} cannot be written "
                          f"({error.strerror or error}): set hydra.run.dir to a writable "
                          "folder") from None
    if fcntl is None:
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = read_holder(path)
        handle.close()
        raise ConfigError(f"run directory {run_dir} is in use by another trainer ({holder}); "
                          "wait for it to end or stop it, or set hydra.run.dir to another "
                          "folder") from None
    except OSError as error:  # e.g. ENOLCK, EOPNOTSUPP on some network file systems
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        log.warning("cannot lock %s (%s): a second trainer started on this run directory "
                    "would not be stopped", path, error.strerror)
        return handle
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on host {socket.gethostname()}, since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


def read_holder(path: Path) -> str:
    """Who holds the lock, as its holder wrote it. The holder writes just after locking:
    a second trainer that reads in between waits a moment for the line."""
    for _ in range(20):
        text = path.read_text().strip()
        if text:
            return text
        time.sleep(0.05)
    return "its pid was not written"
