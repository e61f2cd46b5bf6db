"""The training loop: ``train`` sets a run up and ``fit``s it, step after step, epoch
after epoch, with logging, validation and checkpoints between the steps."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig

from transformer.components import modules_to_trust
from transformer.config import validate as validate_config
from transformer.data import (
    Batch,
    DataError,
    EncodedSplit,
    TokenBatchSampler,
    collate,
    dropped_text,
)
from transformer.data.prefetch import prefetched
from transformer.distributed import (
    barrier,
    check_in_step,
    launch_rank,
    maybe_inject_fault,
    shutdown,
)
from transformer.run_lock import run_dir_lock
from transformer.training.metrics import Progress
from transformer.training.run import Run, setup
from transformer.training.signals import StopSignal, exit_for_requeue, stop_requested
from transformer.training.state import save
from transformer.training.step import train_step
from transformer.training.validation import validate_and_save

log = logging.getLogger("transformer")


def train(cfg: DictConfig, run_dir: Path) -> float:
    """Train as configured; return the best validation metric (what sweepers optimise)."""
    validate_config(cfg)
    # One trainer per run directory, locked by rank 0 for the job before any slow work.
    lock = run_dir_lock(Path(run_dir)) if launch_rank() == 0 else contextlib.nullcontext()
    with lock:
        run = setup(cfg, Path(run_dir))
        try:
            stopped = fit(run)
            # No rank tears the process group down while another still talks through it:
            # gloo then aborts a rank now and then ("terminate called without an active
            # exception").
            barrier(run.ddp)
        finally:
            run.logger.close()
            run.train_module = None  # DDP's reducer goes before the process group: shutdown
            shutdown()
    if stopped is not None:
        exit_for_requeue(stopped)  # under submitit on SLURM: no result yet, the rerun gives it
    return run.state.best if run.state.best is not None else float("nan")


def fit(run: Run) -> str | None:
    """The loop: steps over token-bucketed batches, epoch after epoch, until max_steps,
    max_epochs or early stopping (then None), or until a stop signal (SIGTERM, SIGINT,
    submitit's timeout notice): then it saves and returns the signal's name ("" when it came
    to another rank), and ``trainer.resume=auto`` continues exactly where it stopped."""
    cfg, state = run.cfg.trainer, run.state
    train_split = run.data.splits[run.cfg.data.train_split]
    sampler = TokenBatchSampler.for_split(
        train_split, run.cfg.data.max_tokens, max_sentences=run.cfg.data.max_sentences,
        shuffle=True, seed=cfg.seed,
        rank=run.ddp.rank, world_size=run.ddp.world_size)  # each rank its share of batches
    if len(sampler) == 0:
        raise DataError(f"split {run.cfg.data.train_split!r} has no pairs left to train on")
    valid_split = run.data.splits[run.cfg.data.valid_split]
    if len(valid_split) == 0:  # else validation would divide by zero, after the training
        raise DataError(f"split {valid_split.name!r} (data.valid_split) has no pairs left to "
                        f"validate on: {valid_split.stats.read} read, dropped "
                        f"{dropped_text(valid_split.stats)}")
    progress = Progress(cfg.max_steps, state.step, run.ddp.is_main)
    run.meter.start = time.perf_counter()  # throughput counts from the loop, not from setup
    with StopSignal() as stop:
        stopped = run_steps(run, sampler, train_split, progress, stop)
        progress.close()
        if run.saved_step != state.step:
            save(run)
    if run.ddp.enabled:
        log.info("parameters identical on all %d ranks (checksum %s)", run.ddp.world_size,
                 check_in_step(run.model, run.ddp))
    if stopped:
        log.info("received %s at step %d: saved checkpoint %s, exiting; resume with "
                 "trainer.resume=auto", stop.received or "a stop signal (on another rank)",
                 state.step, run.checkpoint_dir / f"checkpoint_{state.step}.pt")
        return stop.received or ""
    log.info("done: step %d, best %s %s; checkpoints in %s", state.step,
             run.cfg.trainer.best_metric, state.best, run.checkpoint_dir)
    log.info("evaluate with: %s", evaluate_command(run))
    return None


def run_steps(run: Run, sampler: TokenBatchSampler, split: EncodedSplit, progress: Progress,
              stop: StopSignal) -> bool:
    """Optimizer steps until the run is finished; True if a stop signal ended them first.

    Each step is settled (``settle``: counted, logged, validated, saved) once the next
    step's batches are collated and on their way to the device. Whether the step was
    applied or skipped decides the update count and the LR schedule, and reading that flag
    waits for the device; there, a GPU still has the step's optimizer kernel queued, so it
    does not idle while the host reads and acts (on the CPU the read is free)."""
    cfg, state = run.cfg.trainer, run.state
    while not finished(run):
        for micro_batches in grouped(epoch_batches(run, sampler, split), cfg.grad_accum):
            if end := settle(run, progress, stop):
                return end == "stopped"
            maybe_inject_fault(run.ddp.rank, state.step + 1)
            run.unsettled = train_step(run.train_module, micro_batches, run.optimizer,
                                       run.scaler, run.precision, cfg.clip_norm,
                                       cfg.label_smoothing, run.loss_fn, run.ddp)
            state.batch_in_epoch += len(micro_batches)
        if end := settle(run, progress, stop):  # the epoch's last step
            return end == "stopped"
        # the epoch ran out
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        if cfg.val_every_steps is None:
            with run.meter.paused():
                validate_and_save(run)
    return False


def settle(run: Run, progress: Progress, stop: StopSignal) -> str | None:
    """Count the step taken last, if any, and act on it: logs, validation and checkpoints
    after an applied update. "finished" or "stopped" (a stop signal) when the loop ends."""
    if run.unsettled is None:
        return None
    if count_step(run):
        after_step(run, progress)
        if finished(run):
            return "finished"
    return "stopped" if stop_requested(stop, run.ddp) else None


def evaluate_command(run: Run) -> str:
    """The evaluate.py command that scores this run on its test splits as ``test.*`` says."""
    test = run.cfg.test
    if test.average_last > 1:
        checkpoint = f"checkpoint={run.run_dir} average_last={test.average_last}"
    else:  # the best by validation, or the last when no validation ran
        name = "checkpoint_best.pt" if run.state.best is not None else "checkpoint_last.pt"
        checkpoint = f"checkpoint={run.checkpoint_dir / name}"
    trust = modules_to_trust(run.cfg.model)  # the model's parts from outside the package
    trust = f" trust_modules=[{','.join(trust)}]" if trust else ""
    return f"python evaluate.py {checkpoint} beam={test.beam} lenpen={test.lenpen}{trust}"


def finished(run: Run) -> bool:
    cfg, state = run.cfg.trainer, run.state
    if state.step >= cfg.max_steps:
        return True
    if cfg.max_epochs is not None and state.epoch >= cfg.max_epochs:
        return True
    return cfg.patience is not None and state.validations_without_improvement >= cfg.patience


def epoch_batches(run: Run, sampler: TokenBatchSampler, split: EncodedSplit) -> Iterator[Batch]:
    """This epoch's batches from where the run stands (exact resume), on the device;
    collated (and pinned, for a GPU) ``data.prefetch`` batches ahead in a thread."""
    state, overfit = run.state, run.cfg.trainer.overfit_batches
    if overfit:  # the same first batches every epoch
        index_lists = sampler.batches(0)[:overfit][state.batch_in_epoch:]
    else:
        index_lists = sampler.batches(state.epoch, start=state.batch_in_epoch)
    pin = run.device.type == "cuda"
    collated = (collate(split, indices, pin=pin) for indices in index_lists)
    for batch in prefetched(collated, run.cfg.data.prefetch):
        yield batch.to(run.device, non_blocking=True)


def grouped(batches: Iterator[Batch], size: int) -> Iterator[list[Batch]]:
    """Micro-batches for one optimizer step (gradient accumulation)."""
    group: list[Batch] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def after_step(run: Run, progress: Progress) -> None:
    cfg, state = run.cfg.trainer, run.state
    progress.update(state.step)
    if state.step % cfg.log_every_steps == 0:
        metrics = run.meter.summary(run)
        run.logger.scalars(metrics, state.step)
        progress.show(state.step, metrics)
    with run.meter.paused():  # train/tokens_per_s counts training time only
        if cfg.val_every_steps and state.step % cfg.val_every_steps == 0:
            validate_and_save(run)
        elif state.step % cfg.save_every_steps == 0:
            save(run)


def count_step(run: Run) -> bool:
    """Read whether the step taken last was applied (a host sync: ``run_steps`` says when).
    An applied update advances the update count (``state.step``), the LR schedule and the
    logged sums; a skipped step (non-finite loss or gradients) advances none of them, as in
    fairseq, so that a run ends with the schedule of one that never met it. Skipped steps
    are counted and logged; too many in a row stop the run. True if applied."""
    output, run.unsettled = run.unsettled, None
    state = run.state
    if bool(output.finite):
        state.step += 1
        state.skipped_in_a_row = 0
        run.scheduler.step()
        run.meter.add(output)
        return True
    state.skipped_steps += 1
    state.skipped_in_a_row += 1
    attempted = state.step + 1  # the update this step would have been
    run.logger.scalars({"train/skipped_steps": state.skipped_steps}, attempted)
    log.warning("step %d: non-finite loss or gradients, update skipped (%d in a row)",
                attempted, state.skipped_in_a_row)
    if state.skipped_in_a_row >= run.cfg.trainer.max_skipped_steps:
        raise FloatingPointError(
            f"{state.skipped_in_a_row} steps in a row had non-finite loss or gradients "
            f"(step {attempted}); lower optim.lr, raise sched.warmup_steps, or use "
            "trainer.precision=bf16/fp32")
    return False
