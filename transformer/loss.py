"""Label-smoothed cross-entropy, paper section 5.4.

The target distribution puts ``1 - epsilon`` on the reference token and spreads
``epsilon`` uniformly over the vocabulary (PyTorch's ``label_smoothing`` convention);
padding positions are ignored. Sums are returned so that the trainer can normalise by
the number of target tokens of the whole (possibly accumulated) batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def label_smoothed_cross_entropy(
    logits: Tensor, target: Tensor, epsilon: float = 0.1, ignore_index: int = 0
) -> tuple[Tensor, Tensor]:
    """logits (N, V) and target (N,) -> (smoothed loss sum, nll sum), both scalars, fp32.

    The log-softmax runs in float32 whatever the logits' dtype: bf16 log-probabilities
    lose the small differences that label smoothing and perplexity depend on.
    """
    return smoothed_nll(F.log_softmax(logits.float(), dim=-1), target, epsilon, ignore_index)


def smoothed_nll(lprobs: Tensor, target: Tensor, epsilon: float, ignore_index: int
                 ) -> tuple[Tensor, Tensor]:
    """``label_smoothed_cross_entropy`` from log-probabilities (N, V)."""
    keep = target.ne(ignore_index)  # (N,)
    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (N,)
    smooth = -lprobs.mean(dim=-1)  # (N,) cross-entropy against the uniform distribution
    loss = (1.0 - epsilon) * nll + epsilon * smooth
    return loss.masked_fill(~keep, 0.0).sum(), nll.masked_fill(~keep, 0.0).sum()


def rdrop_cross_entropy(
    logits: Tensor, target: Tensor, epsilon: float = 0.1, alpha: float = 5.0,
    ignore_index: int = 0,
) -> tuple[Tensor, Tensor]:
    """R-Drop (Liang et al. 2021, "R-Drop: Regularized Dropout for Neural Networks"): the
    same tokens go through the model twice, with different dropout masks, and the two
    predicted distributions are pulled together. logits (2, N, V): the two passes over
    target (N,) -> (loss sum, nll sum) over the N tokens, fp32, where a token's loss is

        (CE_1 + CE_2) / 2 + alpha / 4 * (KL(p_1 || p_2) + KL(p_2 || p_1))

    with CE the label-smoothed cross-entropy: the paper's objective halved, so that alpha
    means what it means there (5 for translation) and the loss is comparable with a plain
    run's. The nll sum is the two passes' mean."""
    lprobs = F.log_softmax(logits.float(), dim=-1)  # (2, N, V)
    loss, nll = smoothed_nll(lprobs.flatten(0, 1), target.repeat(2), epsilon, ignore_index)
    both_kl, _ = symmetric_kl_and_grad(lprobs, lprobs.exp(), with_grad=False)  # (N, 1)
    both_kl = both_kl.squeeze(1).masked_fill(target.eq(ignore_index), 0.0).sum()
    return loss / 2 + alpha / 4 * both_kl, nll / 2


def linear_label_smoothed_cross_entropy(
    hidden: Tensor, weight: Tensor, target: Tensor, epsilon: float = 0.1,
    ignore_index: int = 0, chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``label_smoothed_cross_entropy(hidden @ weight.T, target, ...)`` without ever holding
    the whole (N, V) logits: hidden (N, d), weight (V, d) (the output projection), target
    (N,) -> (smoothed loss sum, nll sum), float32 scalars; only the loss is differentiable.

    The rows go through in chunks of ``chunk_size`` (default: about ``CHUNK_BYTES`` of
    float32 logits). A chunk's logits give its loss and, at once, its gradient, which is
    folded into the gradients of ``hidden`` and ``weight`` and kept for the backward pass;
    then the chunk is freed. Under autocast the products run in the autocast dtype and the
    softmax and sums in float32, as in ``label_smoothed_cross_entropy``; under fp16 the
    chunk's gradient is scaled into fp16's range for its products (``fp16_gradient_scale``).
    """
    return linear_loss(hidden.unsqueeze(0), weight, target, epsilon, 0.0, ignore_index,
                       chunk_size)


def linear_rdrop_cross_entropy(
    hidden: Tensor, weight: Tensor, target: Tensor, epsilon: float = 0.1, alpha: float = 5.0,
    ignore_index: int = 0, chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``rdrop_cross_entropy(hidden @ weight.T, target, ...)`` chunk by chunk, as
    ``linear_label_smoothed_cross_entropy`` does: hidden (2, N, d), the decoder states of
    the two passes; target (N,)."""
    return linear_loss(hidden, weight, target, epsilon, alpha, ignore_index, chunk_size)


def linear_loss(hidden: Tensor, weight: Tensor, target: Tensor, epsilon: float, alpha: float,
                ignore_index: int, chunk_size: int | None) -> tuple[Tensor, Tensor]:
    """hidden (P, N, d): P = 1 (the plain loss) or 2 (R-Drop) passes over the same rows."""
    device_type = hidden.device.type
    compute_dtype = (torch.get_autocast_dtype(device_type)
                     if torch.is_autocast_enabled(device_type) else hidden.dtype)
    if chunk_size is None:
        rows = CHUNK_BYTES[device_type == "cuda"] // (4 * weight.size(0) * hidden.size(0))
        chunk_size = max(64, rows // 64 * 64)
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden, weight, target, epsilon, alpha, ignore_index,
                                     chunk_size, compute_dtype, with_grad)


# float32 logits per chunk (CPU, CUDA): on the CPU a chunk stays in the cache; on the GPU
# it is large enough to keep the matrix units busy.
CHUNK_BYTES = (1 << 22, 1 << 28)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, target: Tensor, epsilon: float,
                alpha: float, ignore_index: int, chunk_size: int, compute_dtype: torch.dtype,
                with_grad: bool) -> tuple[Tensor, Tensor]:
        # The softmax and the sums in float32 at least (float64 stays float64).
        dtype = torch.promote_types(compute_dtype, torch.float32)
        passes = hidden.size(0)  # the losses of the passes are averaged
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(compute_dtype), weight.to(compute_dtype)  # (P, N, d), (V, d)
            keep = target.ne(ignore_index).to(dtype).unsqueeze(1)  # (N, 1)
            loss_sum = torch.zeros((), device=h.device, dtype=dtype)
            nll_sum = torch.zeros_like(loss_sum)  # a tensor of its own: not differentiable
            # fp16: the products' results are scaled back in float32 (fp16_gradient_scale).
            rescale = compute_dtype == torch.float16
            grad_hidden = torch.empty_like(h, dtype=dtype if rescale else None) \
                if with_grad else None
            grad_weight = None
            kept = keep.to(compute_dtype)  # (N, 1)
            # Ignored rows zeroed: they add nothing to the weight's gradient.
            h_kept = h * kept if with_grad else None  # (P, N, d)
            w_max = w.abs().amax() if with_grad and rescale else None
            for start in range(0, target.size(0), chunk_size):
                rows = slice(start, start + chunk_size)
                # A 2-D product takes the transposed weight as it is (a 3-D one copies it).
                x = (h[:, rows].flatten(0, 1) @ w.T).view(passes, -1, w.size(0)).to(dtype)
                probs = torch.softmax(x, dim=-1)  # (P, C, V)
                # Each row's log-sum-exp from its largest probability, exp(max x - lse),
                # which cannot underflow: no log-softmax pass over the chunk.
                lse = x.amax(-1, keepdim=True) - probs.amax(-1, keepdim=True).log()
                t = target[rows].unsqueeze(1).expand(passes, -1, 1)  # (P, C, 1)
                nll = (lse - x.gather(-1, t)) * keep[rows]  # (P, C, 1)
                smooth = (lse - x.mean(-1, keepdim=True)) * keep[rows]  # vs uniform
                loss_sum = loss_sum + ((1.0 - epsilon) * nll + epsilon * smooth).sum() / passes
                nll_sum = nll_sum + nll.sum() / passes
                kl_grad = None
                if passes == 2:  # R-Drop's term, and its gradient
                    both_kl, kl_grad = symmetric_kl_and_grad(x.sub_(lse), probs, with_grad)
                    loss_sum = loss_sum + alpha / 4 * (both_kl * keep[rows]).sum()
                if with_grad:
                    grad = peaked_grad(probs, t, epsilon, kl_grad, alpha / 4)  # (P, C, V)
                    h_rows = h_kept[:, rows].flatten(0, 1)  # (P C, d)
                    unscale = None
                    if rescale:
                        scale = fp16_gradient_scale(grad, w_max, h_rows)
                        grad, unscale = grad.mul_(scale), scale.reciprocal()
                    grad = grad.to(compute_dtype)
                    for i in range(passes):
                        if unscale is None:
                            torch.mm(grad[i], w, out=grad_hidden[i, rows])  # (C, d)
                        else:  # widened to float32, then scaled back
                            grad_hidden[i, rows] = (grad[i] @ w).to(dtype) * unscale
                    # Ignored rows: their gradient rows are zeroed in (P, C, d), not (P, C, V).
                    grad_hidden[:, rows] *= kept[rows]
                    grad_weight = add_product(grad_weight, grad.flatten(0, 1).T, h_rows,
                                              dtype, unscale)  # (V, d)
        if with_grad:
            if grad_weight is None:  # no rows at all
                grad_weight = torch.zeros_like(w, dtype=dtype)
            # The smoothing's -eps/V is the same for every logit of every kept row, so its
            # share of the two products is added once, here: -eps/V times a sum of rows.
            shift = epsilon / w.size(0) / passes
            grad_hidden -= shift * (kept * w.sum(0, dtype=dtype).to(grad_hidden.dtype))
            grad_weight -= shift * h_kept.sum((0, 1), dtype=dtype)
            ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(nll_sum)
        ctx.input_dtypes = hidden.dtype, weight.dtype
        return loss_sum, nll_sum

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_nll: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.input_dtypes
        return ((grad_hidden * grad_loss).to(hidden_dtype),
                (grad_weight * grad_loss).to(weight_dtype), *[None] * 7)


def peaked_grad(probs: Tensor, target: Tensor, epsilon: float, kl_grad: Tensor | None = None,
                kl_weight: float = 0.0) -> Tensor:
    """d loss / d logits of the rows' smoothed losses, ``softmax - (1 - eps) one_hot -
    eps/V``, averaged over the P passes of ``probs`` (P, ..., V), the softmax (overwritten);
    target (P, ..., 1); R-Drop adds ``kl_weight * kl_grad``. All but the constant -eps/(V P),
    which the caller adds after the products (it is the same for every logit)."""
    grad = probs.scatter_add_(-1, target, probs.new_full(target.shape, epsilon - 1.0))
    if probs.size(0) > 1:
        grad.div_(probs.size(0))
    if kl_grad is not None:
        grad.add_(kl_grad, alpha=kl_weight)
    return grad


def symmetric_kl_and_grad(lprobs: Tensor, p: Tensor, with_grad: bool
                          ) -> tuple[Tensor, Tensor | None]:
    """lprobs (2, C, V) of two passes and p = lprobs.exp() -> KL(p||q) + KL(q||p) (C, 1)
    and, with_grad, its gradient with respect to both passes' logits (2, C, V). With
    d = log p - log q: d/dlogits_p = p (d - KL(p||q)) + p - q, and the same with p and q
    swapped."""
    d = lprobs[0] - lprobs[1]  # (C, V)
    kl_pq = (p[0] * d).sum(-1, keepdim=True)  # (C, 1)
    kl_qp = -(p[1] * d).sum(-1, keepdim=True)
    if not with_grad:
        return kl_pq + kl_qp, None
    grad = torch.stack([p[0] * (d - kl_pq), p[1] * (-d - kl_qp)])
    grad[0] += p[0] - p[1]
    grad[1] += p[1] - p[0]
    return kl_pq + kl_qp, grad


def add_product(total: Tensor | None, a: Tensor, b: Tensor, dtype: torch.dtype,
                unscale: Tensor | None = None) -> Tensor:
    """``total + a @ b * unscale`` in ``dtype``, inside the matrix product when the dtypes
    allow (``out=`` rather than ``addmm_``, which ``torch.utils.flop_counter`` does not
    count). ``unscale`` (fp16's scaled products, ``fp16_gradient_scale``) multiplies the
    product once it is widened to ``dtype``."""
    if total is None:
        product = (a @ b).to(dtype)
        return product if unscale is None else product.mul_(unscale)
    if unscale is not None:  # addcmul_ computes in total's dtype: the product widened first
        return total.addcmul_(a @ b, unscale)
    if a.dtype == dtype:
        return torch.addmm(total, a, b, out=total)
    return total.add_(a @ b)


# Where fp16_gradient_scale puts the largest possible entry of a product: under float16's
# largest finite value, 65504, with room for the rounding of the sums.
FP16_CEILING = 2.0**15


def fp16_gradient_scale(grad: Tensor, weight_max: Tensor, hidden: Tensor) -> Tensor:
    """The power of two by which the chunk's logit gradient ``grad`` (P, C, V), in float32,
    is multiplied before it is rounded to fp16 for its two products, ``grad[i] @ weight``
    and ``grad.T @ hidden`` (hidden (P C, d); ``weight_max`` is max |weight|).

    Unscaled, the entries near 1/V and below (the softmax of every token but the target: at
    V = 37,000 about 3e-5, under fp16's smallest normal number, 6.1e-5) would lose their
    digits or become zero, and so would the weight gradient of every token that is not a
    target in the batch, which Adam then scales up. A GradScaler's factor does not help:
    it reaches this function only in the backward pass, after the rounding. The scale is
    the largest for which no entry of either product can exceed FP16_CEILING: an entry is
    at most a row's (or column's) absolute sum of ``grad`` times the largest entry of
    ``weight`` (or ``hidden``). A 0-dim tensor: no host sync."""
    magnitude = grad.abs()  # (P, C, V)
    row_sum = magnitude.sum(-1).amax()  # also bounds every single entry
    column_sum = magnitude.flatten(0, 1).sum(0).amax()
    bound = torch.maximum(row_sum * weight_max.float().clamp_min(1.0),
                          column_sum * hidden.abs().amax().float())
    # At most 2**24: a chunk whose gradient is all zero (bound 0) gets a finite scale.
    return torch.exp2(torch.floor(torch.log2(FP16_CEILING / bound))).clamp(max=2.0**24)
