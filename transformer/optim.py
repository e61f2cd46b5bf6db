"""Optimizer and learning-rate schedules (paper section 5.3)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from transformer.config import OptimConfig, SchedConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device
                    ) -> torch.optim.Optimizer:
    """AdamW (or Adam) with the paper's betas and epsilon; the fused kernel by default (CUDA
    and CPU: one kernel for all parameters, and a non-finite step skipped without a sync)."""
    fused = cfg.fused if cfg.fused is not None else device.type in ("cuda", "cpu")
    optimizer_class = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return optimizer_class(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                           weight_decay=cfg.weight_decay, fused=fused)


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
