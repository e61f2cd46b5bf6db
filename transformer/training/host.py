"""The process itself: glibc's handling of freed memory, CPU threads, the seeds."""

from __future__ import annotations

import ctypes
import os
import random
import sys

import numpy as np
import torch


def retain_freed_memory() -> bool:
    """Make glibc keep freed blocks of up to 32 MiB in the process. By default it hands
    large blocks (from 128 KiB, raised as it goes) back to the kernel when freed, so each
    CPU step's new activations and logits fault their pages in again: about 12,000 page
    faults a step of the Multi30k recipe, 4,300 with this (docs/benchmarks.md). The
    process then keeps its peak heap. True if glibc took the settings (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)
                and libc.mallopt(m_trim_threshold, 1 << 30))


# Below this width a step's matrix products are too small to split across threads: the
# threads' hand-offs cost more than they save (docs/benchmarks.md, "Threads").
MIN_D_MODEL_FOR_THREADS = 128


def choose_threads(requested: int | None, d_model: int) -> tuple[int, str]:
    """``(threads, why)``: intra-op CPU threads for this process. ``trainer.threads`` if
    set, else ``OMP_NUM_THREADS`` if set, else one for a small model, and otherwise the
    cores this process may use less those other work keeps busy (the load average), shared
    among the processes torchrun starts on this node. A thread on a core that another
    process holds makes every product wait for it: on a 2-core AMD EPYC with one other
    busy process, the recipe's median step took 6.8 s with two threads, 1.8 s with one."""
    if requested is not None:
        return requested, "trainer.threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    if d_model < MIN_D_MODEL_FOR_THREADS:
        return 1, f"model.d_model={d_model} < {MIN_D_MODEL_FOR_THREADS}: too small to split"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    busy = min(os.getloadavg()[0], cores - 1) if hasattr(os, "getloadavg") else 0.0
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    threads = max(1, round(cores - busy) // local_ranks)
    return threads, (f"{cores} usable cores, {busy:.1f} busy with other work (load average), "
                     f"{local_ranks} process(es) on this node")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
