"""``Run``, everything the loop works with, and ``setup``, which builds it once: device,
precision, threads, the start (fresh, fine-tuning or resume), data, model, optimizer."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from transformer.checkpoint import read_tokenizers
from transformer.config import ConfigError, DataConfig
from transformer.data import TranslationData, prepare_data
from transformer.data.multilingual import tag_ids
from transformer.distributed import Distributed, init_distributed, main_first, wrap_for_training
from transformer.logging import NullLogger, build_logger, check_trackers
from transformer.model import Transformer, build_model, count_parameters
from transformer.optim import build_optimizer, build_scheduler
from transformer.precision import Precision, resolve_device
from transformer.resume import adopt_tokenizer_settings, data_fingerprint, data_order_changes
from transformer.tokenizer_files import tokenizers_from_config
from transformer.training.host import choose_threads, retain_freed_memory, seed_everything
from transformer.training.metrics import Meter, flat_hparams, measure_flops_per_token, trial_name
from transformer.training.state import (
    TrainState,
    adopt_architecture,
    find_start,
    load_weights,
    restore,
)
from transformer.training.step import StepOutput, choose_loss_fn

log = logging.getLogger("transformer")


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
    meter: Meter = field(default_factory=Meter)  # sums to log
    flops_per_token: float | None = None
    saved_step: int | None = None  # the step of the newest checkpoint written
    unsettled: StepOutput | None = None  # the step taken last, until count_step reads it
    ddp: Distributed = field(default_factory=Distributed)  # this process's rank, world size
    train_module: nn.Module | None = None  # (loss, nll) = train_module(batch); DDP or FSDP
    fingerprint: dict[str, Any] = field(default_factory=dict)  # of the data order (resume.py)

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"


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
    given_tokenizers = tokenizers_from_config(cfg.data)  # data.tokenizer: the user's own
    if given_tokenizers is not None and init_state is not None:
        raise ConfigError("trainer.init_from brings its checkpoint's tokenizer: leave "
                          "data.tokenizer (and data.src_tokenizer / tgt_tokenizer) unset")
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
    if data_cfg.pairs:  # a tokenizer from a file must have each language's tag
        tag_ids(data_cfg.pairs, data.src_tokenizer)
    fingerprint = data_fingerprint(data_cfg, cfg.trainer, data, ddp.world_size)
    changes = [] if resume_state is None else data_order_changes(
        resume_state, fingerprint, cfg.trainer.reset_dataloader)
    model = build_model(OmegaConf.to_object(cfg.model), data.src_tokenizer.vocab_size,
                        data.tgt_tokenizer.vocab_size).to(device)
    log.info("model: %s parameters", f"{count_parameters(model):,}")
    model.set_activation_checkpointing(cfg.trainer.activation_checkpointing)
    if init_state is not None and resume_state is None:
        load_weights(model, init_state)
    if ddp.enabled:  # the same initial weights on all ranks, but different dropout masks
        seed_everything(cfg.trainer.seed + ddp.rank)
    # Compiling the loss function compiles forward, loss and backward of the model together.
    loss_fn = choose_loss_fn(device, cfg.trainer.compile, cfg.trainer.rdrop_alpha)
    loss_fn = torch.compile(loss_fn) if cfg.trainer.compile else loss_fn
    # Before the optimizer is built: FSDP replaces the parameters with sharded ones.
    train_module = wrap_for_training(model, loss_fn, cfg.trainer.label_smoothing, ddp,
                                     cfg.trainer.strategy)
    optimizer = build_optimizer(model, cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.sched, cfg.trainer.max_steps)
    run = Run(cfg, run_dir, device, precision, data, model, loss_fn, optimizer, scheduler,
              precision.grad_scaler(), NullLogger(), ddp=ddp, train_module=train_module,
              fingerprint=fingerprint)
    if resume_state is not None:
        restore(run, resume_state, changes)
        run.saved_step = run.state.step
    if device.type == "cuda":
        run.flops_per_token = measure_flops_per_token(run)
    if ddp.is_main:  # a resumed run continues the same curves (and W&B / MLflow runs)
        run.logger = build_logger(cfg.logger, run_dir, run.state.step if resume_state
                                  is not None else None, flat_hparams(cfg), trial_name(run_dir))
    return run
