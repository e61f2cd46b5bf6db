"""The speed levers compute what the plain code computes: the chunked output projection
and loss, the fused q/k/v projection, and the sync-free skip of non-finite steps, each
against the straightforward computation (float64 on the CPU; bf16 on CUDA, ``gpu``)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from transformer import MultiHeadAttention, Transformer
from transformer.attention import causal_mask, explicit_attention, fused_attention
from transformer.config import OptimConfig
from transformer.dropout import Dropout
from transformer.loss import (
    label_smoothed_cross_entropy,
    linear_label_smoothed_cross_entropy,
    linear_rdrop_cross_entropy,
)
from transformer.optim import build_optimizer
from transformer.precision import Precision
from transformer.trainer import batch_loss, rdrop_batch_loss, train_step

REPO = Path(__file__).resolve().parents[1]

PAD = 0
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def reference_loss(logits: Tensor, target: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    """The smoothed loss written out in float64, independent of the code under test."""
    lprobs = logits.double().log_softmax(dim=-1)  # (N, V)
    keep = target.ne(PAD)
    nll = -lprobs.gather(1, target[:, None]).squeeze(1)
    smooth = -lprobs.mean(dim=-1)
    loss = (1 - epsilon) * nll + epsilon * smooth
    return loss[keep].sum(), nll[keep].sum()


def loss_and_grads(loss_fn, hidden: Tensor, weight: Tensor, target: Tensor, epsilon: float):
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss, nll = loss_fn(hidden, weight, target, epsilon)
    (loss * 0.37).backward()  # any upstream factor, as the 1 / n_tokens of the trainer
    return loss.detach(), nll.detach(), hidden.grad, weight.grad


def random_problem(N: int, d: int, V: int, dtype=torch.float64, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, d, generator=generator, dtype=torch.float64)
    weight = torch.randn(V, d, generator=generator, dtype=torch.float64) / d**0.5
    target = torch.randint(1, V, (N,), generator=generator)
    target[torch.randperm(N, generator=generator)[: N // 4]] = PAD  # padding positions
    return hidden.to(device, dtype), weight.to(device, dtype), target.to(device)


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("chunk_size", [1, 5, 37, 64, None])
def test_linear_loss_matches_float64_reference(epsilon, chunk_size):
    hidden, weight, target = random_problem(N=37, d=8, V=19, seed=chunk_size or 0)

    def fused(h, w, t, eps):
        return linear_label_smoothed_cross_entropy(h, w, t, eps, PAD, chunk_size)

    def plain(h, w, t, eps):
        return reference_loss(h @ w.T, t, eps)

    for got, expected in zip(loss_and_grads(fused, hidden, weight, target, epsilon),
                             loss_and_grads(plain, hidden, weight, target, epsilon),
                             strict=True):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def reference_rdrop(logits: Tensor, target: Tensor, epsilon: float, alpha: float):
    """R-Drop's objective, halved, in float64: logits (2, N, V) of two passes."""
    (loss_p, nll_p), (loss_q, nll_q) = (reference_loss(x, target, epsilon) for x in logits)
    keep = target.ne(PAD)
    lp, lq = (x[keep].double().log_softmax(dim=-1) for x in logits)
    both_kl = (F.kl_div(lq, lp, log_target=True, reduction="sum")  # KL(p || q)
               + F.kl_div(lp, lq, log_target=True, reduction="sum"))
    return (loss_p + loss_q) / 2 + alpha / 4 * both_kl, (nll_p + nll_q) / 2


@pytest.mark.parametrize("chunk_size", [1, 5, 37, None])
def test_linear_rdrop_loss_matches_float64_reference(chunk_size):
    """The chunked R-Drop loss and its hand-derived gradients against autograd through
    torch's own KL divergence and the plain loss, both passes, padding included."""
    hidden, weight, target = random_problem(N=2 * 37, d=8, V=19, seed=chunk_size or 0)
    hidden = hidden.unflatten(0, (2, 37))  # two passes that differ, as dropout makes them
    target = target[:37]

    def fused(h, w, t, eps):
        return linear_rdrop_cross_entropy(h, w, t, eps, 3.0, PAD, chunk_size)

    def plain(h, w, t, eps):
        return reference_rdrop(h @ w.T, t, eps, 3.0)

    for got, expected in zip(loss_and_grads(fused, hidden, weight, target, 0.1),
                             loss_and_grads(plain, hidden, weight, target, 0.1),
                             strict=True):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_linear_loss_equals_the_plain_loss_in_float32():
    hidden, weight, target = random_problem(N=50, d=16, V=300, dtype=torch.float32)

    def fused(h, w, t, eps):
        return linear_label_smoothed_cross_entropy(h, w, t, eps, PAD, chunk_size=7)

    def plain(h, w, t, eps):
        return label_smoothed_cross_entropy(h @ w.T, t, eps, PAD)

    for got, expected in zip(loss_and_grads(fused, hidden, weight, target, 0.1),
                             loss_and_grads(plain, hidden, weight, target, 0.1), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_linear_loss_without_grad_keeps_nothing():
    hidden, weight, target = random_problem(N=20, d=8, V=11)
    hidden.requires_grad_()
    with torch.no_grad():
        loss, nll = linear_label_smoothed_cross_entropy(hidden, weight, target, 0.1, PAD, 3)
    expected_loss, expected_nll = reference_loss(hidden @ weight.T, target, 0.1)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(nll, expected_nll)
    assert not loss.requires_grad


def test_linear_loss_under_cpu_bf16_autocast_is_close_to_the_plain_one():
    hidden, weight, target = random_problem(N=64, d=32, V=500, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_and_grads(lambda h, w, t, e: linear_label_smoothed_cross_entropy(
            h, w, t, e, PAD, 16), hidden, weight, target, 0.1)
        expected = loss_and_grads(lambda h, w, t, e: label_smoothed_cross_entropy(
            F.linear(h, w), t, e, PAD), hidden, weight, target, 0.1)
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


# What the trainer's fp16 step multiplies the loss by: a GradScaler's initial scale, 2**16,
# times 1 / n_tokens of a 4096-token batch.
FP16_LOSS_FACTOR = 2.0**16 / 4096


@pytest.mark.parametrize("rdrop", [False, True])
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_linear_loss_fp16_gradients_keep_the_entries_near_one_over_v(rdrop, epsilon):
    """Under fp16 autocast (as trainer.precision=fp16 runs it, the GradScaler's factor on
    the loss) at V = 37,000, every entry of the logit gradient is within 2**-10 relative of
    the float32 one (fp16 keeps 11 bits; the label smoothing's -eps/V is added in float32,
    hence the absolute 2**-10 eps/V). Most entries, softmax probabilities around 1/V =
    2.7e-5 and below, lie under fp16's smallest normal number (6.1e-5); rounded there
    unscaled, as they once were, those near 1e-7 lost tens of percent. The entries are read
    off the weight gradient: each pass has one token whose state is 1 on its own half of the
    d features and 0 elsewhere, so row v of the weight gradient is the gradient of logit v,
    pass by pass. The logits are exact in fp16 (sums of 16 multiples of 1/16), so only the
    gradient's rounding is measured. The states' gradient (a sum over V) is held to the same
    bound relative to the sum of the absolute values of its terms."""
    V, d, passes = 37_000, 32, 2 if rdrop else 1
    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(-8, 9, (V, d), generator=generator).float() / 16
    hidden = torch.zeros(passes, 2, d)  # row 1 is padding
    for i in range(passes):
        hidden[i, 0, i * d // 2:(i + 1) * d // 2] = 1.0
    target = torch.tensor([int(torch.randint(1, V, (1,), generator=generator)), PAD])

    def grads(dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype == torch.float16):
            if rdrop:
                loss, _ = linear_rdrop_cross_entropy(h, w, target, epsilon, 5.0, PAD)
            else:
                loss, _ = linear_label_smoothed_cross_entropy(h[0], w, target, epsilon, PAD)
        (loss * FP16_LOSS_FACTOR).backward()
        return h.grad / FP16_LOSS_FACTOR, w.grad / FP16_LOSS_FACTOR

    (hidden16, weight16), (hidden32, weight32) = grads(torch.float16), grads(torch.float32)
    logit_grads = weight32.unflatten(1, (2, d // 2))[:, :passes, 0]  # (V, P)
    assert (logit_grads.abs() < 6.1e-5).float().mean() > 0.5  # mostly under fp16's normals
    for half in range(passes):  # each entry of pass `half`, d/2 times over
        columns = slice(half * d // 2, (half + 1) * d // 2)
        torch.testing.assert_close(weight16[:, columns], weight32[:, columns], rtol=2**-10,
                                   atol=2**-10 * epsilon / V)
    scale = logit_grads.abs().T @ weight.abs()  # (P, d): sums of |terms|
    assert ((hidden16[:, 0] - hidden32[:, 0]).abs() <= 2**-10 * scale).all()
    assert hidden16[:, 1].abs().max() == 0  # padding


@dataclass
class Batch:
    src_tokens: Tensor
    tgt_input: Tensor
    tgt_output: Tensor
    n_tgt_tokens: int


def tiny_model_and_batch(dtype=torch.float64, device="cpu") -> tuple[Transformer, Batch]:
    torch.manual_seed(0)
    model = Transformer(31, 31, d_model=16, n_heads=2, n_encoder_layers=2, n_decoder_layers=2,
                        d_ff=32, dropout=0.0, share_embeddings="all").to(device, dtype)
    src = torch.randint(3, 31, (3, 7))
    src[0, 5:] = PAD
    tgt = torch.randint(3, 31, (3, 6))
    tgt[1, 4:] = PAD
    tgt_input = torch.cat([torch.ones(3, 1, dtype=torch.long), tgt[:, :-1]], dim=1)
    batch = Batch(src.to(device), tgt_input.to(device), tgt.to(device), int(tgt.ne(PAD).sum()))
    return model, batch


def test_batch_loss_and_gradients_equal_the_logits_path():
    """The trainer's chunked loss, tied embeddings and all, against logits + plain loss."""
    model, batch = tiny_model_and_batch()
    loss, nll = batch_loss(model, batch, 0.1)
    loss.backward()
    fused_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    logits = model(batch.src_tokens, batch.tgt_input)
    expected, expected_nll = reference_loss(logits.flatten(0, 1), batch.tgt_output.flatten(), 0.1)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(nll, expected_nll, rtol=1e-10, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused_grads[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_compiled_batch_loss_follows_every_label_smoothing():
    """``trainer.compile=true`` compiles ``batch_loss``, and a sweep calls it with several
    label smoothings in one process. torch 2.13 compiles a float that feeds both arithmetic
    and a fill value (``new_full``, ``add_(alpha=)``, as the chunked loss's gradient does)
    to the first value it traced (docs/benchmarks.md): each smoothing must still give the
    eager loss and gradients. (The third value is the one that would come out wrong.)"""
    _, batch = tiny_model_and_batch()
    torch.manual_seed(0)
    model = Transformer(31, 31, d_model=16, n_heads=2, n_encoder_layers=1, n_decoder_layers=1,
                        d_ff=32, dropout=0.0, share_embeddings="all")  # less to compile
    compiled = torch.compile(batch_loss)
    for epsilon in (0.0, 0.1, 0.3):
        results = []
        for loss_fn in (batch_loss, compiled):
            model.zero_grad()
            loss, nll = loss_fn(model, batch, epsilon)
            loss.backward()
            results.append([loss.detach(), nll.detach()] +
                           [p.grad.clone() for p in model.parameters()])
        for got, expected in zip(results[1], results[0], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5,
                                       msg=f"label smoothing {epsilon}")


@pytest.mark.parametrize("output_bias", [False, True])  # chunked / whole-logits path
def test_rdrop_batch_loss_without_dropout_is_the_plain_loss(output_bias):
    """Both R-Drop passes of a model without dropout are the same: no KL term, and the
    loss and gradients are the plain loss's (this also checks that each copy's logits
    meet their own sentence's targets)."""
    model, batch = tiny_model_and_batch()
    if output_bias:
        model.output_projection.bias = torch.nn.Parameter(torch.randn(31, dtype=torch.float64))
    loss, nll = rdrop_batch_loss(model, batch, 0.1, alpha=5.0)
    loss.backward()
    rdrop_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    expected, expected_nll = batch_loss(model, batch, 0.1)
    expected.backward()
    torch.testing.assert_close((loss.double(), nll.double()),
                               (expected.double(), expected_nll.double()), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(rdrop_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_qkv_projection_equals_three_products():
    torch.manual_seed(0)
    mha = MultiHeadAttention(24, 3).double()
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    fused = mha(x, x, x, is_causal=True)  # one product for q, k, v
    separate = mha(x, x.clone(), x.clone(), is_causal=True)  # three products
    torch.testing.assert_close(fused, separate, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.3])
def test_cpu_dropout_keeps_the_distribution(p):
    torch.manual_seed(0)
    dropout = Dropout(p)
    n = 400_003  # not a multiple of the four elements one 64-bit draw serves
    x = torch.ones(n, requires_grad=True)
    y = dropout(x)
    kept = y.ne(0)
    p_used = round(p * 65536) / 65536
    assert abs(p_used - p) < 1e-5
    # The drop rate within 5 standard deviations of a binomial's.
    assert abs(1 - kept.double().mean().item() - p_used) < 5 * (p * (1 - p) / n) ** 0.5
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - p_used)))
    # The expectation is exact: E[y] = x, up to the sampling noise of the mean.
    assert abs(y.double().mean().item() - 1) < 5 * (p / (1 - p) / n) ** 0.5
    # The four 16-bit coins of one draw are independent: neighbours agree as often as
    # independent coins would.
    k = kept.double()
    for lag in (1, 2, 3, 4):
        agree = (k[lag:] == k[:-lag]).double().mean().item()
        expected = p_used**2 + (1 - p_used) ** 2
        assert abs(agree - expected) < 0.01, lag
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # the gradient goes through the mask
    assert dropout.eval()(x) is x


def test_cpu_dropout_follows_the_seed_and_the_dtype():
    x = torch.ones(3, 5, 7, dtype=torch.bfloat16)
    torch.manual_seed(1)
    a = Dropout(0.2)(x)
    torch.manual_seed(1)
    b = Dropout(0.2)(x)
    assert a.dtype == torch.bfloat16 and a.shape == x.shape
    assert torch.equal(a, b)
    assert not torch.equal(a, Dropout(0.2)(x))  # the next draw differs


def test_attention_under_cpu_bf16_autocast_runs_in_float32():
    """Under CPU bf16 autocast the fused path computes attention in float32 (the CPU
    kernel's bf16 backward is slow): the result equals float32 attention of the
    bf16-rounded inputs, rounded to bf16, and the gradients reach q, k and v."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 6, 8).bfloat16().requires_grad_() for _ in range(3))
    mask = torch.ones(3, 1, 1, 6, dtype=torch.bool)
    mask[0, ..., 4:] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_attention(q, k, v, mask, 0.0, False)
        causal = fused_attention(q, k, v, None, 0.0, True)
    assert out.dtype == torch.bfloat16
    expected, _ = explicit_attention(q.double(), k.double(), v.double(), mask)
    torch.testing.assert_close(out, expected.bfloat16(), rtol=2**-8, atol=1e-6)
    expected_causal, _ = explicit_attention(q.double(), k.double(), v.double(),
                                            causal_mask(6, 6))
    torch.testing.assert_close(causal, expected_causal.bfloat16(), rtol=2**-8, atol=1e-6)
    (out.float().sum() + causal.float().sum()).backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (q, k, v))


def make_step(fused: bool, device: str = "cpu"):
    model, batch = tiny_model_and_batch(torch.float32, device)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, fused=fused), torch.device(device))
    precision = Precision.resolve("fp32", torch.device(device))

    def step(b: Batch = batch):
        return train_step(model, [b], optimizer, precision.grad_scaler(), precision, 1.0, 0.1)
    return model, batch, optimizer, step


def poison_and_snapshot(model: Transformer, optimizer: torch.optim.Optimizer):
    """Put a nan into one weight (the next loss and gradients are nan), then copy the
    parameters and the optimizer state."""
    with torch.no_grad():
        model.decoder.layers[0].feed_forward.linear1.weight[0, 0] = float("nan")
    params = [p.detach().clone() for p in model.parameters()]
    states = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()]
    return params, states


def assert_unchanged(model: Transformer, optimizer: torch.optim.Optimizer, params, states):
    for before, p in zip(params, model.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), before, rtol=0, atol=0, equal_nan=True)
    for before, p in zip(states, model.parameters(), strict=True):
        for key, value in before.items():
            torch.testing.assert_close(optimizer.state[p][key], value, rtol=0, atol=0)


@pytest.mark.parametrize("fused", [False, True])
def test_non_finite_step_is_skipped_exactly(fused):
    """With fused AdamW the skip needs no host sync; parameters and optimizer state must
    stay exactly as they were, as on the synchronising path."""
    model, _, optimizer, step = make_step(fused)
    step()
    params, states = poison_and_snapshot(model, optimizer)
    assert not bool(step().finite)
    assert_unchanged(model, optimizer, params, states)
    assert not hasattr(optimizer, "found_inf")


# ---------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@cuda
def test_linear_loss_bf16_on_cuda_is_close_to_float64():
    hidden, weight, target = random_problem(N=1000, d=64, V=5000, dtype=torch.float32,
                                            device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = loss_and_grads(lambda h, w, t, e: linear_label_smoothed_cross_entropy(
            h, w, t, e, PAD, 256), hidden, weight, target, 0.1)
    expected = loss_and_grads(lambda h, w, t, e: reference_loss(h @ w.T, t, e),
                              hidden.double(), weight.double(), target, 0.1)
    for a, b in zip(got, expected, strict=True):
        relative = (a.double() - b).norm() / b.norm()
        assert relative < 1e-2, relative


@pytest.mark.gpu
@cuda
def test_fused_attention_equals_explicit_in_bf16_on_cuda():
    from transformer.attention import explicit_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 8, 64, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = torch.rand(4, 1, 1, 64, device="cuda") > 0.3
    mask[..., 0] = True
    for kwargs, explicit_mask in [({"is_causal": True}, torch.ones(64, 64, dtype=torch.bool,
                                                                   device="cuda").tril()),
                                  ({"attn_mask": mask}, mask)]:
        fast = F.scaled_dot_product_attention(q, k, v, **kwargs)
        slow, _ = explicit_attention(q.double(), k.double(), v.double(), explicit_mask)
        assert ((fast.double() - slow).norm() / slow.norm()) < 1e-2


@pytest.mark.gpu
@cuda
def test_sync_free_skip_on_cuda():
    model, _, optimizer, step = make_step(True, "cuda")
    step()
    params, states = poison_and_snapshot(model, optimizer)
    assert not bool(step().finite)
    assert_unchanged(model, optimizer, params, states)


@pytest.mark.gpu
@cuda
def test_compiled_step_matches_eager_on_cuda():
    losses = []
    for compile in (False, True):
        model, batch, optimizer, _ = make_step(True, "cuda")
        precision = Precision.resolve("bf16", torch.device("cuda"))
        loss_fn = torch.compile(batch_loss) if compile else batch_loss
        outputs = [train_step(model, [batch], optimizer, precision.grad_scaler(), precision,
                              1.0, 0.1, loss_fn) for _ in range(3)]
        losses.append(torch.stack([o.loss_sum for o in outputs]))
    torch.testing.assert_close(losses[0], losses[1], rtol=2e-2, atol=1e-2)


FREED_MEMORY_CHECK = """
import ctypes, sys, torch
from transformer.trainer import retain_freed_memory

class MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "retain":
    assert retain_freed_memory()
torch.ones(64, 64).sum()  # torch's own start-up allocations come first
mapped = libc.mallinfo2().hblkhd
buffer = torch.empty(1 << 21).fill_(1.0)  # 8 MiB
mapped = libc.mallinfo2().hblkhd - mapped
del buffer
print(mapped, libc.mallinfo2().fordblks)
"""


def freed_buffer(mode: str) -> tuple[int, int]:
    """``(bytes mmapped for an 8 MiB buffer, bytes free in the heap once it is freed)`` in a
    fresh process (a long test process's heap, or page-fault counts, vary with its past)."""
    result = subprocess.run([sys.executable, "-c", FREED_MEMORY_CHECK, mode],
                            capture_output=True, text=True, cwd=REPO, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    mapped, free = map(int, result.stdout.split()[-2:])
    return mapped, free


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    """By default glibc serves an 8 MiB buffer by mmap and unmaps it on free, so the next
    one faults its 2048 pages in afresh; after ``retain_freed_memory`` it comes from the
    heap and stays there, free for the next buffer, its pages already mapped."""
    mapped, _ = freed_buffer("default")
    assert mapped >= 8 << 20
    mapped, free = freed_buffer("retain")
    assert mapped == 0 and free >= 8 << 20, (mapped, free)
