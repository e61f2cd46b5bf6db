"""Stopping cleanly on SIGTERM/SIGINT (preemption, Ctrl-C), on every rank at one step."""

from __future__ import annotations

import logging
import os
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


# EX_TEMPFAIL of sysexits.h: "try again later".
REQUEUE_STATUS = 75


def exit_for_requeue() -> None:
    """After a stop signal under hydra-submitit-launcher on SLURM (configs/hydra/launcher/
    slurm.yaml), exit 75 instead of returning. A preempted or ``scontrol requeue``-d job
    is requeued by SLURM whatever its exit status, and reruns with the same job id, the
    same sweep point and run directory (trainer.resume=auto continues there). But had the
    task function returned, submitit would write the job's result file, and the launcher
    waiting on it would take the job as finished, with the stopped run's result, while
    SLURM runs it again. ``SystemExit`` is no ``Exception``: submitit writes no result,
    the launcher keeps waiting, and the rerun writes the result. Elsewhere (a terminal,
    torchrun) a stopped run exits 0, as before."""
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        log.info("exiting %d: SLURM requeues the job and trainer.resume=auto continues it",
                 REQUEUE_STATUS)
        raise SystemExit(REQUEUE_STATUS)
