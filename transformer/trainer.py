"""The training loop and its parts: one optimizer step, validation, the loop itself."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sacrebleu
import torch
from omegaconf import DictConfig, OmegaConf
from sacrebleu.metrics import BLEU
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from transformer.checkpoint import (
    CheckpointError,
    latest_valid_checkpoint,
    read_checkpoint,
    read_tokenizers,
    tokenizer_entry,
    write_checkpoints,
)
from transformer.components import check_fine_tuning_parts, modules_to_trust
from transformer.config import ConfigError, DataConfig, ModelConfig, TrainerConfig
from transformer.config import validate as validate_config
from transformer.data import (
    Batch,
    DataError,
    EncodedSplit,
    TokenBatchSampler,
    TranslationData,
    collate,
    dropped_text,
    prepare_data,
)
from transformer.decoding import evaluating, translate_ids
from transformer.distributed import (
    SINGLE_PROCESS,
    Distributed,
    LossModule,
    any_rank,
    barrier,
    check_in_step,
    gather,
    gradient_sync,
    init_distributed,
    launch_rank,
    main_first,
    maybe_inject_fault,
    shutdown,
    sum_over_ranks,
    wrap_for_training,
)
from transformer.logging import NullLogger, build_logger, check_trackers
from transformer.loss import (
    label_smoothed_cross_entropy,
    linear_label_smoothed_cross_entropy,
    linear_rdrop_cross_entropy,
    rdrop_cross_entropy,
)
from transformer.model import Transformer, build_model, count_parameters, keep_attention_weights
from transformer.optim import build_optimizer, build_scheduler
from transformer.precision import Precision, resolve_device
from transformer.resume import (
    adopt_tokenizer_settings,
    data_fingerprint,
    data_order_changes,
    reseeded,
)
from transformer.run_lock import run_dir_lock
from transformer.tokenizer import EOS_ID


@dataclass
class StepOutput:
    """What one optimizer step reports; tensors stay on the device (no host sync)."""

    loss_sum: Tensor  # label-smoothed loss summed over target tokens
    nll_sum: Tensor
    n_tokens: int | Tensor  # target tokens, all micro-batches (and ranks) together
    grad_norm: Tensor  # before clipping
    finite: Tensor  # False when the loss or a gradient was inf/nan (the update was skipped)


def batch_loss(model: nn.Module, batch, label_smoothing: float, pad_id: int = 0
               ) -> tuple[Tensor, Tensor]:
    """Teacher-forced (loss sum, nll sum) of one batch. The output projection and the loss
    run together, chunk by chunk, so that the (B*T, V) float32 logits never exist whole
    (``linear_label_smoothed_cross_entropy``; docs/benchmarks.md has what it saves)."""
    if model.output_projection.bias is not None:  # the chunked kernel takes no bias (Marian)
        return logits_batch_loss(model, batch, label_smoothing, pad_id)
    memory, src_padding_mask = model.encode(batch.src_tokens)
    states = model.decode_states(batch.tgt_input, memory, src_padding_mask)  # (B, T, d)
    return linear_label_smoothed_cross_entropy(
        states.flatten(0, 1), model.output_projection.weight, batch.tgt_output.flatten(),
        label_smoothing, pad_id)


def logits_batch_loss(model: nn.Module, batch, label_smoothing: float, pad_id: int = 0
                      ) -> tuple[Tensor, Tensor]:
    """The same loss through the whole (B*T, V) logits: fewer, larger kernels."""
    logits = model(batch.src_tokens, batch.tgt_input)  # (B, T, V)
    return label_smoothed_cross_entropy(logits.flatten(0, 1), batch.tgt_output.flatten(),
                                        label_smoothing, pad_id)


def rdrop_batch_loss(model: nn.Module, batch, label_smoothing: float, pad_id: int = 0,
                     alpha: float = 5.0) -> tuple[Tensor, Tensor]:
    """R-Drop (``rdrop_cross_entropy``): the batch goes through the model twice in one
    forward, stacked along the batch axis, so each copy gets its own dropout masks. The
    loss is chunked as in ``batch_loss``."""
    src_tokens = torch.cat([batch.src_tokens, batch.src_tokens])  # (2B, S)
    tgt_input = torch.cat([batch.tgt_input, batch.tgt_input])
    target = batch.tgt_output.flatten()
    if model.output_projection.bias is not None:
        logits = model(src_tokens, tgt_input)  # (2B, T, V)
        return rdrop_cross_entropy(logits.unflatten(0, (2, -1)).flatten(1, 2), target,
                                   label_smoothing, alpha, pad_id)
    memory, src_padding_mask = model.encode(src_tokens)
    states = model.decode_states(tgt_input, memory, src_padding_mask)  # (2B, T, d)
    return linear_rdrop_cross_entropy(states.unflatten(0, (2, -1)).flatten(1, 2),
                                      model.output_projection.weight, target, label_smoothing,
                                      alpha, pad_id)


def choose_loss_fn(device: torch.device, compile: bool, rdrop_alpha: float = 0.0) -> Callable:
    """The faster loss path, as measured by scripts/benchmark.py (docs/benchmarks.md): on
    a GPU without compile the whole-logits path wins (its kernels are few and large); with
    torch.compile, and on the CPU, the chunked one wins and holds far less memory.
    ``rdrop_alpha`` > 0: the R-Drop loss (chunked, with the two passes side by side)."""
    if rdrop_alpha > 0:
        return functools.partial(rdrop_batch_loss, alpha=rdrop_alpha)
    return logits_batch_loss if device.type == "cuda" and not compile else batch_loss


def train_step(model: nn.Module, micro_batches: Sequence, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, precision: Precision,
               clip_norm: float | None, label_smoothing: float,
               loss_fn: Callable = batch_loss, ddp: Distributed = SINGLE_PROCESS) -> StepOutput:
    """Forward, label-smoothed loss, backward over each micro-batch (gradient accumulation),
    then unscale, clip and one optimizer update, skipped when the loss or a gradient is
    inf/nan (``StepOutput.finite``). The loss is normalised by the target tokens of all
    micro-batches, so accumulation equals one big batch. ``loss_fn``: ``batch_loss`` or
    ``torch.compile(batch_loss)``, which compiles forward, loss and backward together.
    ``model``: the Transformer, or ``wrap_for_training``'s module (DDP over ``ddp``'s ranks;
    its ``loss_fn`` and label smoothing then apply). The LR schedule is the caller's: it
    advances only with an applied update (``count_step``), which the flag tells without
    a host sync here."""
    if not isinstance(model, (LossModule, nn.parallel.DistributedDataParallel)):
        model = LossModule(model, loss_fn, label_smoothing)
    n_tokens = step_tokens(micro_batches, ddp)
    loss_total = nll_total = torch.zeros((), device=micro_batches[0].src_tokens.device)
    for i, batch in enumerate(micro_batches):
        # Gradients are all-reduced once per step, in the last micro-batch's backward.
        with gradient_sync(model, sync=i == len(micro_batches) - 1):
            with precision.autocast():
                loss, nll = model(batch)
            # DDP averages gradients over ranks; times world_size, the average is the
            # gradient of the summed loss over all tokens of all ranks / those tokens.
            scaler.scale(loss * ddp.world_size / n_tokens).backward()
        loss_total, nll_total = loss_total + loss.detach(), nll_total + nll.detach()
    if ddp.enabled:  # the step's loss over all ranks, for logging and the finite check
        loss_total, nll_total = sum_over_ranks(torch.stack([loss_total, nll_total]), ddp)
    scaler.unscale_(optimizer)
    max_norm = clip_norm if clip_norm else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    # One rule for every precision: no update from a non-finite loss or gradient. With fp16
    # these include the overflows the GradScaler found in unscale_ (inf/nan gradients give
    # a non-finite norm), for which update() lowers its scale; the scaler's own step() is
    # not used, so that it cannot apply an update this flag skips.
    finite = torch.isfinite(loss_total) & torch.isfinite(grad_norm)
    if optimizer.defaults.get("fused"):
        # Fused AdamW skips a step itself when given GradScaler's ``found_inf`` flag:
        # never a nan/inf update, and no host sync.
        optimizer.found_inf = (~finite).float()
        optimizer.step()
        del optimizer.found_inf
    elif finite:  # a host sync: never apply a nan/inf update
        optimizer.step()
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return StepOutput(loss_total, nll_total, n_tokens, grad_norm, finite)


def step_tokens(micro_batches: Sequence, ddp: Distributed) -> int | Tensor:
    """Target tokens of the step on all ranks: an int in one process; across ranks an
    all-reduced tensor (kept on the device: no host sync)."""
    n_tokens = sum(batch.n_tgt_tokens for batch in micro_batches)
    if not ddp.enabled:
        return n_tokens
    device = micro_batches[0].src_tokens.device
    return sum_over_ranks(torch.tensor(n_tokens, device=device, dtype=torch.float32), ddp)


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------

log = logging.getLogger("transformer")

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12}  # bf16 dense


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    step: int = 0  # updates applied: a skipped step does not count (fairseq's num_updates)
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed, skipped or not
    best: float | None = None  # best validation metric so far
    validations_without_improvement: int = 0
    skipped_steps: int = 0  # non-finite steps, in total and in a row
    skipped_in_a_row: int = 0


@dataclass
class Run:
    """Everything the loop works with, built once by ``setup``."""

    cfg: DictConfig
    run_dir: Path
    device: torch.device
    precision: Precision
    data: TranslationData
    model: Transformer
    loss_fn: Callable  # batch_loss, or torch.compile(batch_loss) with trainer.compile
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    scaler: torch.amp.GradScaler
    logger: NullLogger
    state: TrainState = field(default_factory=TrainState)
    meter: Meter = field(default_factory=lambda: Meter())  # (defined below) sums to log
    flops_per_token: float | None = None
    saved_step: int | None = None  # the step of the newest checkpoint written
    unsettled: StepOutput | None = None  # the step taken last, until count_step reads it
    ddp: Distributed = field(default_factory=Distributed)  # this process's rank, world size
    train_module: nn.Module | None = None  # (loss, nll) = train_module(batch); DDP-wrapped
    fingerprint: dict[str, Any] = field(default_factory=dict)  # of the data order (resume.py)

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"


def train(cfg: DictConfig, run_dir: Path) -> float:
    """Train as configured; return the best validation metric (what sweepers optimise)."""
    validate_config(cfg)
    # One trainer per run directory, locked by rank 0 for the job before any slow work.
    lock = run_dir_lock(Path(run_dir)) if launch_rank() == 0 else contextlib.nullcontext()
    with lock:
        run = setup(cfg, Path(run_dir))
        try:
            fit(run)
            # No rank tears the process group down while another still talks through it:
            # gloo then aborts a rank now and then ("terminate called without an active
            # exception").
            barrier(run.ddp)
        finally:
            run.logger.close()
            shutdown()
    return run.state.best if run.state.best is not None else float("nan")


def setup(cfg: DictConfig, run_dir: Path) -> Run:
    check_trackers(cfg.logger)  # a missing wandb / mlflow package: before any slow work
    try:
        device = resolve_device(cfg.trainer.device)
    except RuntimeError as error:  # trainer.device=cuda on a machine without one
        raise ConfigError(str(error)) from None
    ddp, device = init_distributed(device, cfg.trainer.dist_timeout_s)
    if device.type == "cpu":
        retain_freed_memory()
    precision = Precision.resolve(cfg.trainer.precision, device)
    log.info("precision: %s (%s)", precision.name, precision.reason)
    threads, why = choose_threads(cfg.trainer.threads, cfg.model.d_model)
    torch.set_num_threads(threads)
    log.info("CPU threads: %d (%s)", threads, why)
    init_state, resume_state = find_start(cfg.trainer, run_dir)  # before any slow work
    given_tokenizers = None
    if init_state is not None:  # fine-tuning: the checkpoint's architecture and tokenizer
        adopt_architecture(cfg, init_state["config"]["model"])
        given_tokenizers = read_tokenizers(init_state["tokenizer"])
    if resume_state is not None:  # the run's own tokenizer, whatever the cache holds now
        adopt_tokenizer_settings(cfg.data, resume_state["config"]["data"])
        given_tokenizers = read_tokenizers(resume_state["tokenizer"])
    seed_everything(cfg.trainer.seed)
    data_cfg: DataConfig = OmegaConf.to_object(cfg.data)
    with main_first(ddp):  # rank 0 tokenises and caches; the others then read the cache
        data = prepare_data(data_cfg, splits=[data_cfg.train_split, data_cfg.valid_split],
                            log=log.info, given_tokenizers=given_tokenizers)
    fingerprint = data_fingerprint(data_cfg, cfg.trainer, data, ddp.world_size)
    changes = [] if resume_state is None else data_order_changes(
        resume_state, fingerprint, cfg.trainer.reset_dataloader)
    model = build_model(OmegaConf.to_object(cfg.model), data.src_tokenizer.vocab_size,
                        data.tgt_tokenizer.vocab_size).to(device)
    log.info("model: %s parameters", f"{count_parameters(model):,}")
    if init_state is not None and resume_state is None:
        load_weights(model, init_state)
    if ddp.enabled:  # the same initial weights on all ranks, but different dropout masks
        seed_everything(cfg.trainer.seed + ddp.rank)
    optimizer = build_optimizer(model, cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.sched, cfg.trainer.max_steps)
    # Compiling the loss function compiles forward, loss and backward of the model together.
    loss_fn = choose_loss_fn(device, cfg.trainer.compile, cfg.trainer.rdrop_alpha)
    loss_fn = torch.compile(loss_fn) if cfg.trainer.compile else loss_fn
    run = Run(cfg, run_dir, device, precision, data, model, loss_fn, optimizer, scheduler,
              precision.grad_scaler(), NullLogger(), ddp=ddp, fingerprint=fingerprint)
    if resume_state is not None:
        restore(run, resume_state, changes)
        run.saved_step = run.state.step
    run.train_module = wrap_for_training(model, loss_fn, cfg.trainer.label_smoothing, ddp)
    if device.type == "cuda":
        run.flops_per_token = measure_flops_per_token(run)
    if ddp.is_main:  # a resumed run continues the same curves (and W&B / MLflow runs)
        run.logger = build_logger(cfg.logger, run_dir, run.state.step if resume_state
                                  is not None else None, flat_hparams(cfg), trial_name(run_dir))
    return run


def fit(run: Run) -> None:
    """The loop: steps over token-bucketed batches, epoch after epoch, until max_steps,
    max_epochs or early stopping, or until SIGTERM/SIGINT: then it saves and returns, and
    ``trainer.resume=auto`` continues exactly where it stopped."""
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
        return
    log.info("done: step %d, best %s %s; checkpoints in %s", state.step,
             run.cfg.trainer.best_metric, state.best, run.checkpoint_dir)
    log.info("evaluate with: %s", evaluate_command(run))


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
    """This epoch's batches from where the run stands (exact resume), on the device."""
    state, overfit = run.state, run.cfg.trainer.overfit_batches
    if overfit:  # the same first batches every epoch
        index_lists = sampler.batches(0)[:overfit][state.batch_in_epoch:]
    else:
        index_lists = sampler.batches(state.epoch, start=state.batch_in_epoch)
    for indices in index_lists:
        yield collate(split, indices).to(run.device, non_blocking=True)


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


class Meter:
    """Sums the applied steps' outputs on the device; one host sync per logging interval
    (skipped steps stay out: their loss is nan or inf). The sums go into
    checkpoints: a run resumed between two log lines logs the same averages as one that went
    on (float(x) of a float32 sum, added to the next float32 value, gives the same bits)."""

    SUMS = ("loss", "nll", "grad_norm", "tokens", "steps")

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss = self.nll = self.grad_norm = 0.0
        self.tokens = self.steps = 0
        self.start = time.perf_counter()

    def state_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in self.SUMS}

    def load_state_dict(self, sums: dict[str, float]) -> None:
        for name in self.SUMS:
            setattr(self, name, sums[name])

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (validation, saving) does not count towards tokens/s."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - start

    def add(self, output: StepOutput) -> None:
        self.loss = self.loss + output.loss_sum
        self.nll = self.nll + output.nll_sum
        self.grad_norm = self.grad_norm + output.grad_norm
        self.tokens = self.tokens + output.n_tokens
        self.steps += 1

    def summary(self, run: Run) -> dict[str, float]:
        seconds = time.perf_counter() - self.start
        tokens = max(int(self.tokens), 1)
        nll = float(self.nll) / tokens
        metrics = {
            "train/loss": float(self.loss) / tokens,
            "train/nll_loss": nll,
            "train/ppl": math.exp(min(nll, 50.0)),
            "train/lr": run.optimizer.param_groups[0]["lr"],
            "train/grad_norm": float(self.grad_norm) / max(self.steps, 1),
            "train/tokens_per_s": tokens / seconds,  # of all ranks together
        }
        peak = peak_flops(run.device)
        if run.flops_per_token and peak:
            metrics["train/mfu"] = metrics["train/tokens_per_s"] * run.flops_per_token / peak
        if run.scaler.is_enabled():
            metrics["train/loss_scale"] = run.scaler.get_scale()
        self.reset()
        return metrics


class Progress:
    """A tqdm bar on a terminal; plain log lines otherwise (log files, SLURM)."""

    def __init__(self, total: int, initial: int, enabled: bool = True):
        self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, leave=False) \
            if enabled and sys.stderr.isatty() else None

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def show(self, step: int, metrics: dict[str, float]) -> None:
        short = {"loss": f"{metrics['train/loss']:.3f}", "lr": f"{metrics['train/lr']:.2e}",
                 "tok/s": f"{metrics['train/tokens_per_s']:.0f}"}
        if self.bar is not None:
            self.bar.set_postfix(short)
        else:
            log.info("step %d | %s", step, " | ".join(f"{k} {v}" for k, v in short.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def validate_and_save(run: Run) -> None:
    """Validate, keep the best checkpoint, count validations without improvement, save.
    Every rank gets the same metrics (validate sums over ranks), so all stop together."""
    metrics = validate(run)
    state, key = run.state, run.cfg.trainer.best_metric
    value = metrics[f"val/{key}"]
    improved = state.best is None or (value > state.best if key == "bleu" else value < state.best)
    if improved:
        state.best, state.validations_without_improvement = value, 0
    else:
        state.validations_without_improvement += 1
    log.info("step %d | %s%s", state.step,
             " | ".join(f"{k} {v:.4g}" for k, v in metrics.items()), " (best)" if improved else "")
    save(run, best=improved)


@torch.inference_mode()
def validate(run: Run) -> dict[str, float]:
    """val/loss and val/ppl teacher-forced over the whole val split; val/bleu from greedy
    (or trainer.val_beam) translations; examples and attention maps to TensorBoard. Under
    DDP each rank takes every world_size-th batch and sentence on the bare model; the sums
    (loss, tokens, BLEU's n-gram counts) are added over ranks: the whole split's metrics."""
    with evaluating(run.model):
        return validation_metrics(run, run.data.splits[run.cfg.data.valid_split])


def validation_metrics(run: Run, split: EncodedSplit) -> dict[str, float]:
    model, cfg, ddp = run.model, run.cfg, run.ddp
    loss = nll = 0.0
    tokens = 0
    sampler = TokenBatchSampler.for_split(split, cfg.data.max_tokens, shuffle=False)
    for indices in sampler.batches(0)[ddp.rank::ddp.world_size]:
        batch = collate(split, indices).to(run.device)
        with run.precision.autocast():
            batch_loss_sum, batch_nll = batch_loss(model, batch, cfg.trainer.label_smoothing)
        loss, nll, tokens = loss + batch_loss_sum, nll + batch_nll, tokens + batch.n_tgt_tokens
    sums = sum_over_ranks(torch.tensor([float(loss), float(nll), tokens], dtype=torch.float64,
                                       device=run.device), ddp).tolist()
    nll_per_token = sums[1] / sums[2]
    metrics = {"val/loss": sums[0] / sums[2], "val/nll_loss": nll_per_token,
               "val/ppl": math.exp(min(nll_per_token, 50.0))}
    metrics["val/bleu"] = validation_bleu(run, split)
    run.logger.scalars(metrics, run.state.step)
    if cfg.logger.attention_maps and ddp.is_main:
        log_attention_maps(run, split)
    return metrics


def validation_bleu(run: Run, split: EncodedSplit) -> float:
    """Corpus BLEU of the first val_max_sentences, lowercased when the tokenizer lowercases
    (``data.lowercase``); under DDP each rank translates every world_size-th sentence and
    the n-gram statistics are summed over ranks."""
    n = min(run.cfg.trainer.val_max_sentences or len(split.src_ids), len(split.src_ids))
    mine = range(run.ddp.rank, n, run.ddp.world_size)
    src_ids = [split.src_ids[i] + [EOS_ID] for i in mine]
    hypotheses = []
    if src_ids:  # a rank can be left without sentences when there are fewer than ranks
        with run.precision.autocast():
            hypotheses = translate_ids(run.model, src_ids, beam=run.cfg.trainer.val_beam,
                                       max_tokens=run.cfg.data.max_tokens)
        hypotheses = run.data.tgt_tokenizer.decode_batch(hypotheses)
    references = [split.tgt_text[i] for i in mine]
    for example, i in enumerate(mine[:run.cfg.logger.n_examples]):
        run.logger.text(f"val/example_{example}", f"**source:** {split.src_text[i]}  \n"
                        f"**reference:** {references[example]}  \n"
                        f"**hypothesis:** {hypotheses[example]}", run.state.step)
    stats = bleu_statistics(hypotheses, references, lowercase=run.cfg.data.lowercase)
    stats = sum_over_ranks(torch.tensor(stats, dtype=torch.float64, device=run.device),
                           run.ddp).long().tolist()
    return BLEU.compute_bleu(correct=stats[0:4], total=stats[4:8], sys_len=stats[8],
                             ref_len=stats[9], smooth_method="exp").score


def bleu_statistics(hypotheses: list[str], references: list[str], lowercase: bool = False
                    ) -> list[int]:
    """BLEU's sufficient statistics, which add up over parts of a corpus: matching and total
    n-grams for n = 1..4, hypothesis and reference lengths (sacrebleu's defaults)."""
    if not hypotheses:
        return [0] * 10
    score = sacrebleu.corpus_bleu(hypotheses, [references], lowercase=lowercase)
    return [*score.counts, *score.totals, score.sys_len, score.ref_len]


def log_attention_maps(run: Run, split: EncodedSplit) -> None:
    """Head 0 of the last layer's encoder self-, decoder self- and cross-attention for the
    first val sentence, teacher-forced on its reference."""
    batch = collate(split, [0]).to(run.device)
    src_labels = run.data.src_tokenizer.id_tokens(batch.src_tokens[0].tolist())
    tgt_labels = run.data.tgt_tokenizer.id_tokens(batch.tgt_input[0].tolist())
    with keep_attention_weights(run.model) as modules:
        run.model(batch.src_tokens, batch.tgt_input)
        last_enc, last_dec = len(run.model.encoder.layers) - 1, len(run.model.decoder.layers) - 1
        maps = {
            "encoder_self": (modules[f"encoder.layers.{last_enc}.self_attn"], src_labels,
                             src_labels),
            "decoder_self": (modules[f"decoder.layers.{last_dec}.self_attn"], tgt_labels,
                             tgt_labels),
            "cross": (modules[f"decoder.layers.{last_dec}.cross_attn"], src_labels, tgt_labels),
        }
        layers = {"encoder_self": (last_enc, len(run.model.encoder.layers))}
        layers["decoder_self"] = layers["cross"] = (last_dec, len(run.model.decoder.layers))
        for name, (module, keys, queries) in maps.items():
            layer, n_layers = layers[name]
            title = f"{name.replace('_', ' ')} attention, layer {layer + 1} of {n_layers}, head 1"
            run.logger.attention_map(f"attention/{name}", module.last_weights[0, 0], keys,
                                     queries, run.state.step, title=title)


# ----------------------------------------------------------------------------------------
# Checkpoints and resume
# ----------------------------------------------------------------------------------------


def save(run: Run, best: bool = False) -> None:
    """checkpoint_last.pt, a numbered copy (the last keep_last kept) and, if best,
    checkpoint_best.pt; each written atomically, by rank 0. Every rank calls it: each
    hands over its RNG state, so that a resume restores all ranks' dropout streams."""
    rngs = gather(rng_state(), run.ddp)
    run.saved_step = run.state.step
    if run.ddp.is_main:
        write_checkpoints(checkpoint_state(run, rngs), run.checkpoint_dir, best,
                          run.cfg.trainer.keep_last)
    # Once save returns on any rank the checkpoint is on disk: a rank that dies later (and
    # takes the job down with it) cannot cut rank 0's writing short. The others would wait
    # for rank 0 at the next step's all-reduce anyway.
    barrier(run.ddp)


def checkpoint_state(run: Run, rngs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """What a checkpoint holds; ``rngs``: each rank's RNG state (default: this process's)."""
    data = run.data
    rngs = rngs or [rng_state()]
    return {
        "model": run.model.state_dict(),  # the bare model: no DDP "module." prefix
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "step": run.state.step,
        "train_state": asdict(run.state),
        "meter": run.meter.state_dict(),
        "rng": rngs[0],
        "rng_per_rank": rngs,
        "world_size": run.ddp.world_size,
        "data_fingerprint": run.fingerprint,  # compared on resume (resume.py)
        "config": OmegaConf.to_container(run.cfg, resolve=True),
        "tokenizer": tokenizer_entry(data.src_tokenizer, data.tgt_tokenizer),
        "vocab_size": {"src": data.src_tokenizer.vocab_size, "tgt": data.tgt_tokenizer.vocab_size},
    }


def find_start(cfg: TrainerConfig, run_dir: Path
               ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """``(init, resume)``: the checkpoint to fine-tune from (``trainer.init_from``: its
    weights, architecture and tokenizer, with a new optimizer and schedule from step 0) and
    the one to continue exactly (``trainer.resume``: the whole training state). A resume
    checkpoint that holds weights only (converted by ``scripts/convert_marian.py``, or
    averaged) is a fine-tuning start. With both, a run resumed from its own checkpoint keeps
    the architecture and tokenizer of ``init_from``."""
    resume = find_resume(cfg.resume, run_dir)
    if resume is not None and "optimizer" not in resume:
        if cfg.init_from is not None:
            raise ConfigError(f"trainer.resume={cfg.resume} holds weights only, so it cannot "
                              f"resume a run; with trainer.init_from={cfg.init_from}, use "
                              "trainer.resume=auto or never")
        log.info("trainer.resume=%s holds model weights only (an imported or averaged "
                 "checkpoint): fine-tuning it from step 0 with a new optimizer", cfg.resume)
        return resume, None
    init = None
    if cfg.init_from is not None:
        init = read_checkpoint(cfg.init_from)
        if resume is None:
            log.info("fine-tuning %s (step %d of its run) from step 0 with a new optimizer",
                     cfg.init_from, init["step"])
    return init, resume


def adopt_architecture(cfg: DictConfig, model_cfg: dict[str, Any]) -> None:
    """Fine-tuning: ``cfg.model`` becomes the checkpoint's, except its dropouts, which stay
    this run's (regularisation is a training choice)."""
    check_fine_tuning_parts(model_cfg, cfg.model)  # its parts' code, before importing it
    mine = {key: cfg.model[key] for key in ("dropout", "attention_dropout", "activation_dropout",
                                            "token_dropout")}
    cfg.model = OmegaConf.merge(OmegaConf.structured(ModelConfig), model_cfg, mine)
    log.info("model: the checkpoint's architecture (model.* settings other than dropouts "
             "are not used): %s", {k: v for k, v in cfg.model.items() if k not in mine})
    validate_config(cfg)  # e.g. data.max_len against the checkpoint's model.max_len


def load_weights(model: nn.Module, checkpoint: dict[str, Any]) -> None:
    """The checkpoint's weights into ``model``; a CheckpointError when they do not fit (another
    model config or vocabulary)."""
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise CheckpointError(f"the checkpoint does not fit this model config and vocabulary: "
                              f"{error}") from error


def find_resume(resume: str, run_dir: Path) -> dict[str, Any] | None:
    """trainer.resume: never | auto (this run directory's newest valid checkpoint, if any)
    | a checkpoint file or run directory."""
    if resume == "never":
        return None
    if resume == "auto":
        directory = run_dir / "checkpoints"
        found = latest_valid_checkpoint(directory)
        if found is None and any(directory.glob("*.pt")):
            raise CheckpointError(f"trainer.resume=auto: no checkpoint in {directory} loads "
                                  "(see the warnings above); move them away to start afresh")
        if found is None:
            log.info("trainer.resume=auto: no checkpoint in %s, starting fresh", run_dir)
            return None
        log.info("resuming from %s", found[0])
        return found[1]
    log.info("resuming from %s", resume)
    return read_checkpoint(resume)


def restore(run: Run, checkpoint: dict[str, Any], changes: Sequence[str] = ()) -> None:
    """The checkpoint's whole training state into ``run``. ``changes``: what of the data
    order ``trainer.reset_dataloader`` accepted (``data_order_changes``); then the current
    epoch restarts at its first batch."""
    load_weights(run.model, checkpoint)
    try:
        run.optimizer.load_state_dict(checkpoint["optimizer"])
    except ValueError as error:  # other parameter groups (weight decay and optim.no_decay)
        raise CheckpointError(
            f"the checkpoint's optimizer state does not fit this run's parameter groups "
            f"({error}): resume with the optim.weight_decay and optim.no_decay it was "
            "trained with (optim.no_decay=[] for a run from before that key existed)"
        ) from None
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    run.scaler.load_state_dict(checkpoint["scaler"])
    run.state = TrainState(**checkpoint["train_state"])
    if "meter" in checkpoint:  # older checkpoints: a fresh meter
        run.meter.load_state_dict(checkpoint["meter"])
    rngs = checkpoint.get("rng_per_rank", [checkpoint["rng"]])
    if len(rngs) == run.ddp.world_size:
        set_rng_state(rngs[run.ddp.rank])
    else:  # another world size, accepted: the saved streams do not map onto these ranks
        seed_everything(reseeded(run.cfg.trainer.seed, run.state.step, run.ddp.rank))
    if changes:
        log.warning("trainer.reset_dataloader=true: %s; epoch %d restarts at its first batch "
                    "(the checkpoint was at batch %d of it)", "; ".join(changes),
                    run.state.epoch, run.state.batch_in_epoch)
        run.state.batch_in_epoch = 0
    log.info("resumed at step %d (epoch %d, batch %d)", run.state.step, run.state.epoch,
             run.state.batch_in_epoch)


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors and plain data (weights-only loading reads
    them): numpy's tuple becomes a dict, its uint32 key array an int64 tensor."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = {"bit_generator": name, "keys": torch.from_numpy(keys.astype(np.int64)),
                   "pos": int(pos), "has_gauss": int(has_gauss),
                   "cached_gaussian": float(cached_gaussian)}
    return {"python": random.getstate(), "numpy": numpy_state,
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state()``'s states; numpy's also from the tuple of format-1 checkpoints."""
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["bit_generator"],
                       numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


# ----------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """model.d_model=..., optim.lr=...: the keys a sweep varies, for the HParams table;
    the command line's overrides first."""
    flat = {}
    for override in command_line_overrides():
        key, _, _ = override.lstrip("+~").partition("=")
        try:
            value = OmegaConf.select(cfg, key)
        except Exception:  # an override of something that is not a config value
            continue
        if value is None or isinstance(value, (int, float, str, bool)):
            flat[key] = "None" if value is None else value
    for group in ("model", "optim", "sched", "data"):
        for key, value in OmegaConf.to_container(cfg[group], resolve=True).items():
            if value is None or isinstance(value, (int, float, str, bool)):
                flat[f"{group}.{key}"] = "None" if value is None else value
    for key in ("max_steps", "grad_accum", "clip_norm", "label_smoothing", "seed"):
        flat[f"trainer.{key}"] = cfg.trainer[key] if cfg.trainer[key] is not None else "None"
    return flat


def command_line_overrides() -> list[str]:
    """This job's overrides of the config (``model.n_layers=2``, a sweep's values
    included), without Hydra's own; empty outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith("hydra.")]


# Overrides that say where things are, not what the run is: left out of its HParams name.
PLACE_KEYS = ("data.root", "data.cache_dir", "trainer.resume", "trainer.reset_dataloader",
              "trainer.threads", "logger.")


def trial_name(run_dir: Path) -> str:
    """The HParams row of this run: what it changed (``model.n_layers=2,optim.lr=5e-4``),
    else its run directory."""
    changes = [o for o in command_line_overrides() if not o.lstrip("+~").startswith(PLACE_KEYS)]
    return ",".join(changes) or str(run_dir)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def measure_flops_per_token(run: Run) -> float:
    """Forward+backward FLOPs per target token, counted once before training on a batch of
    the first 32 pairs (torch.utils.flop_counter); used for train/mfu. Its dropout draws
    happen in a forked RNG, so a resumed run's random streams match an uninterrupted one."""
    from torch.utils.flop_counter import FlopCounterMode

    split = run.data.splits[run.cfg.data.train_split]
    batch = collate(split, list(range(min(32, len(split.src_ids))))).to(run.device)
    counter = FlopCounterMode(display=False)
    # Under DDP through the training module, without the gradient all-reduce (no real step).
    module = run.train_module if run.ddp.enabled else LossModule(
        run.model, batch_loss, run.cfg.trainer.label_smoothing)
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []), \
            counter, run.precision.autocast(), gradient_sync(module, sync=False):
        loss, _ = module(batch)
        loss.backward()
    run.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch.n_tgt_tokens
