"""Optimizer and learning-rate schedules (paper section 5.3)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from transformer.config import ConfigError, OptimConfig, SchedConfig
from transformer.positional import PositionalEncoding


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device
                    ) -> torch.optim.Optimizer:
    """AdamW (or Adam) with the paper's betas and epsilon; the fused kernel by default (CUDA
    and CPU: one kernel for all parameters, and a non-finite step skipped without a sync).
    Weight decay spares what ``optim.no_decay`` names (``parameter_groups``)."""
    fused = cfg.fused if cfg.fused is not None else device.type in ("cuda", "cpu")
    optimizer_class = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return optimizer_class(parameter_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas),
                           eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused)


# The kinds optim.no_decay can name: (module, the parameter's name in it) -> whether the
# parameter is of that kind. "norm" covers any module whose class name holds "Norm"
# (LayerNorm, RMSNorm, a user's own); "embedding" token tables, a weight tied to them
# (the output projection with model.share_embeddings) and learned position tables.
NO_DECAY_KINDS: dict[str, Callable[[nn.Module, str], bool]] = {
    "bias": lambda module, name: name == "bias",
    "norm": lambda module, name: "Norm" in type(module).__name__,
    "embedding": lambda module, name: isinstance(module, (nn.Embedding, PositionalEncoding)),
}


def parameter_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: with weight decay, the parameters that decay, and
    those ``optim.no_decay`` exempts (weight_decay 0); otherwise, and when nothing is
    exempt, one group (what checkpoints from before ``optim.no_decay`` hold)."""
    if cfg.weight_decay == 0:
        return [{"params": list(model.parameters())}]
    exempt = no_decay_names(model, cfg.no_decay)
    named = list(model.named_parameters())
    groups = [{"params": [p for name, p in named if name not in exempt]},
              {"params": [p for name, p in named if name in exempt], "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def no_decay_names(model: nn.Module, no_decay: Sequence[str]) -> set[str]:
    """The names (as ``model.named_parameters()`` gives them) of the parameters that
    ``no_decay`` exempts from weight decay. An entry is a kind (``NO_DECAY_KINDS``), or
    else a regular expression searched in every name a parameter has: a tied weight has
    several (``output_projection.weight`` is also an embedding's). A kind may match nothing
    (a model without biases); an expression that matches nothing is a ConfigError, so that
    a misspelt kind does not silently decay what it meant to spare."""
    exempt: set[int] = set()  # ids of parameters
    for entry in no_decay:
        if entry in NO_DECAY_KINDS:
            is_kind = NO_DECAY_KINDS[entry]
            exempt |= {id(p) for module in model.modules()
                       for name, p in module.named_parameters(recurse=False)
                       if is_kind(module, name)}
            continue
        found = {id(p) for name, p in model.named_parameters(remove_duplicate=False)
                 if re.search(entry, name)}
        if not found:
            example = next(name for name, _ in model.named_parameters())
            raise ConfigError(f"optim.no_decay: {entry!r} is not one of {list(NO_DECAY_KINDS)} "
                              "and, as a regular expression, matches no parameter name "
                              f"(such as {example!r})")
        exempt |= found
    return {name for name, p in model.named_parameters() if id(p) in exempt}


def lr_factor(step: int, cfg: SchedConfig, max_steps: int, peak_lr: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (1-based).

    inverse_sqrt: linear warmup, then ``sqrt(warmup / step)``, which is the paper's
    ``d^-0.5 * min(step^-0.5, step * warmup^-1.5)`` with the peak set by ``optim.lr``.
    """
    warmup = max(cfg.warmup_steps, 0)
    if step < warmup:
        return step / warmup
    if cfg.name == "inverse_sqrt":
        return math.sqrt(warmup / step) if warmup > 0 else 1.0 / math.sqrt(step)
    if cfg.name == "cosine":
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        floor = cfg.min_lr / peak_lr
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0  # constant


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedConfig, max_steps: int
                    ) -> LambdaLR:
    peak_lr = optimizer.param_groups[0]["lr"]
    # LambdaLR counts from 0 before the first step; our steps count from 1.
    return LambdaLR(optimizer, lambda i: lr_factor(i + 1, cfg, max_steps, peak_lr))
