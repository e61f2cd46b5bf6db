"""One optimizer step: the teacher-forced loss of a batch (chunked, whole-logits or
R-Drop, and which of them to use), then ``train_step`` over its micro-batches."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from transformer.distributed import (
    SINGLE_PROCESS,
    Distributed,
    LossModule,
    gradient_sync,
    sum_over_ranks,
)
from transformer.loss import (
    label_smoothed_cross_entropy,
    linear_label_smoothed_cross_entropy,
    linear_rdrop_cross_entropy,
    rdrop_cross_entropy,
)
from transformer.precision import Precision


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
