"""Stopping cleanly on SIGTERM/SIGINT (preemption, Ctrl-C), on every rank at one step."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from transformer.distributed import Distributed, any_rank

log = logging.getLogger("transformer")


class StopSignal:
    """SIGTERM and SIGINT while ``fit`` runs: the preemption notice of SLURM, torchrun and
    Kubernetes, and Ctrl-C. The handler only notes the signal (a Python flag); the loop
    checks it at the next step boundary, saves a checkpoint there and returns, so the
    process exits 0. Repeats change nothing: SLURM and torchrun may each send one to the
    same worker. Handlers can only be installed in the main thread; elsewhere the signals
    keep their usual effect (a checkpoint on disk is whole whenever a process dies)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None  # the first signal's name
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self.note) for number in self.SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)

    def note(self, number: int, frame: object) -> None:
        if self.received is None:
            self.received = signal.Signals(number).name
            log.warning("received %s: saving a checkpoint after this step, then exiting",
                        self.received)


def stop_requested(stop: StopSignal, ddp: Distributed) -> bool:
    """Whether to stop after this step. One process: the flag alone, no host sync. Under
    torchrun all ranks must stop at the same step, or those that go on wait forever in the
    next gradient all-reduce while the others wait in save's gather; a signal can reach the
    ranks during different steps, or reach only some of them. So every rank passes its flag
    to ``any_rank`` each step: one all-reduce of one int on the CPU (gloo), no GPU sync."""
    return any_rank(stop.received is not None, ddp)
