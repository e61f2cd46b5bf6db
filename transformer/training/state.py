"""Checkpoints and resume: what a checkpoint holds (``TrainState``, weights, optimizer,
RNG streams of every rank), where a run starts from, and restoring it exactly."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from transformer.checkpoint import (
    CheckpointError,
    latest_valid_checkpoint,
    read_checkpoint,
    tokenizer_entry,
    write_checkpoints,
)
from transformer.components import check_fine_tuning_parts
from transformer.config import ConfigError, ModelConfig, TrainerConfig
from transformer.config import validate as validate_config
from transformer.distributed import barrier, gather
from transformer.fsdp import load_sharded, save_sharded
from transformer.resume import reseeded
from transformer.training.host import seed_everything

if TYPE_CHECKING:
    from transformer.training.run import Run

log = logging.getLogger("transformer")


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


def save(run: Run, best: bool = False) -> None:
    """checkpoint_last.pt, a numbered copy (the last keep_last kept) and, if best,
    checkpoint_best.pt; each written atomically, by rank 0. Every rank calls it: each
    hands over its RNG state, so that a resume restores all ranks' dropout streams."""
    rngs = gather(rng_state(), run.ddp)
    run.saved_step = run.state.step
    # FSDP: every rank writes its shards; rank 0 gets the full weights (None: not sharded).
    sharded = save_sharded(run.model, run.optimizer, run.checkpoint_dir, run.state.step,
                           run.ddp)
    if run.ddp.is_main:
        write_checkpoints(checkpoint_state(run, rngs, sharded), run.checkpoint_dir, best,
                          run.cfg.trainer.keep_last)
    # Once save returns on any rank the checkpoint is on disk: a rank that dies later (and
    # takes the job down with it) cannot cut rank 0's writing short. The others would wait
    # for rank 0 at the next step's all-reduce anyway.
    barrier(run.ddp)


def checkpoint_state(run: Run, rngs: list[dict[str, Any]] | None = None,
                     sharded: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint holds; ``rngs``: each rank's RNG state (default: this process's);
    ``sharded``: ``save_sharded``'s entries, in place of the model and optimizer state."""
    data = run.data
    rngs = rngs or [rng_state()]
    return {
        **(sharded or {"model": run.model.state_dict(),  # the bare model: no "module."
                       "optimizer": run.optimizer.state_dict()}),
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
    if not load_sharded(run.model, run.optimizer, checkpoint):  # else an FSDP run's
        load_weights(run.model, checkpoint)
        try:
            run.optimizer.load_state_dict(checkpoint["optimizer"])
        except ValueError as error:  # other parameter groups (weight decay, optim.no_decay)
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
