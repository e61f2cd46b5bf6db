"""Stopping cleanly on SIGTERM/SIGINT (preemption, Ctrl-C) and on submitit's timeout
notice (SIGUSR2 under SLURM), on every rank at one step."""

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

    SIGNALS = (signal.SIGTERM, signal.SIGINT)  # and, under submitit, its timeout notice

    def __init__(self) -> None:
        self.received: str | None = None  # the first signal's name
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            numbers = (*self.SIGNALS, *filter(None, [submitit_timeout_signal()]))
            self.previous = {number: signal.signal(number, self.note) for number in numbers}
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


def submitit_timeout_signal() -> signal.Signals | None:
    """The signal submitit asks SLURM to send ``signal_delay_s`` before the job's time limit
    (``--signal=USR2@...``; SUBMITIT_PREEMPT_SIGNAL names another), under submitit on
    SLURM; None elsewhere."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return None
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)


# EX_TEMPFAIL of sysexits.h: "try again later".
REQUEUE_STATUS = 75


def exit_for_requeue(received: str) -> None:
    """After a stop signal under hydra-submitit-launcher on SLURM (configs/hydra/launcher/
    slurm.yaml), exit 75 instead of returning. A preempted or ``scontrol requeue``-d job
    is requeued by SLURM whatever its exit status, and reruns with the same job id, the
    same sweep point and run directory (trainer.resume=auto continues there). But had the
    task function returned, submitit would write the job's result file, and the launcher
    waiting on it would take the job as finished, with the stopped run's result, while
    SLURM runs it again. ``SystemExit`` is no ``Exception``: submitit writes no result,
    the launcher keeps waiting, and the rerun writes the result. Elsewhere (a terminal,
    torchrun) a stopped run exits 0, as before.

    Submitit's timeout notice (``received``, the stopping signal's name) is no requeue by
    itself: submitit's own handler requeues the job (``scontrol requeue``, at most
    ``max_num_timeout`` times) and exits. ``StopSignal`` took that signal over for the
    loop, to save at a step boundary first (submitit's handler would exit mid-step, and
    the rerun would start from the last periodic checkpoint); now that the checkpoint is
    saved, the handler, restored by ``StopSignal``, does the requeue. It acts on global
    rank 0 only and returns on the others, which exit 75 here; the SIGTERM of the requeue
    finds submitit's handler, which logs it and lets the process end."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return
    timeout = submitit_timeout_signal()
    if timeout is not None and received == timeout.name:
        handler = signal.getsignal(timeout)
        if callable(handler):
            log.info("%s was submitit's timeout notice: its handler requeues the job",
                     received)
            handler(timeout, None)  # requeues and exits on rank 0
    log.info("exiting %d: SLURM requeues the job and trainer.resume=auto continues it",
             REQUEUE_STATUS)
    raise SystemExit(REQUEUE_STATUS)
