"""The stable import path of the training code: ``from transformer.trainer import train,
train_step, batch_loss, ...`` and ``from transformer import trainer`` keep working for
scripts. The code lives in ``transformer/training/``, one concern a module (its
``__init__`` has the map); this module only re-exports it.

A test or script that replaces a function (``monkeypatch.setattr``) must do so in the module
that looks the name up, e.g. ``transformer.training.loop.train_step``: replacing it here
changes nothing that the training code calls.
"""

from transformer.training.host import (
    MIN_D_MODEL_FOR_THREADS,
    choose_threads,
    retain_freed_memory,
    seed_everything,
)
from transformer.training.loop import (
    after_step,
    count_step,
    epoch_batches,
    evaluate_command,
    finished,
    fit,
    grouped,
    run_steps,
    settle,
    train,
)
from transformer.training.metrics import (
    PEAK_FLOPS,
    PLACE_KEYS,
    Meter,
    Progress,
    command_line_overrides,
    flat_hparams,
    measure_flops_per_token,
    peak_flops,
    trial_name,
)
from transformer.training.run import Run, setup
from transformer.training.signals import StopSignal, stop_requested
from transformer.training.state import (
    TrainState,
    adopt_architecture,
    checkpoint_state,
    find_resume,
    find_start,
    load_weights,
    restore,
    rng_state,
    save,
    set_rng_state,
)
from transformer.training.step import (
    StepOutput,
    batch_loss,
    choose_loss_fn,
    logits_batch_loss,
    rdrop_batch_loss,
    step_tokens,
    train_step,
)
from transformer.training.validation import (
    bleu_statistics,
    log_attention_maps,
    validate,
    validate_and_save,
    validation_bleu,
    validation_metrics,
)

__all__ = [
    "MIN_D_MODEL_FOR_THREADS", "PEAK_FLOPS", "PLACE_KEYS", "Meter", "Progress", "Run",
    "StepOutput", "StopSignal", "TrainState", "adopt_architecture", "after_step", "batch_loss",
    "bleu_statistics", "checkpoint_state", "choose_loss_fn", "choose_threads",
    "command_line_overrides", "count_step", "epoch_batches", "evaluate_command", "find_resume",
    "find_start", "finished", "fit", "flat_hparams", "grouped", "load_weights",
    "log_attention_maps", "logits_batch_loss", "measure_flops_per_token", "peak_flops",
    "rdrop_batch_loss", "restore", "retain_freed_memory", "rng_state", "run_steps", "save",
    "seed_everything", "set_rng_state", "settle", "setup", "step_tokens", "stop_requested",
    "train", "train_step", "trial_name", "validate", "validate_and_save", "validation_bleu",
    "validation_metrics",
]
