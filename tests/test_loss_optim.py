import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from transformer import components
from transformer.config import ConfigError, ModelConfig, OptimConfig, SchedConfig
from transformer.loss import label_smoothed_cross_entropy, rdrop_cross_entropy
from transformer.model import build_model
from transformer.optim import build_optimizer, build_scheduler, lr_factor, no_decay_names


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.3])
def test_loss_matches_torch_cross_entropy(epsilon):
    torch.manual_seed(0)
    logits = torch.randn(12, 17, dtype=torch.float64)
    target = torch.randint(0, 17, (12,))
    target[[2, 5]] = 0  # padding
    loss, nll = label_smoothed_cross_entropy(logits, target, epsilon, ignore_index=0)
    expected = F.cross_entropy(logits, target, ignore_index=0, reduction="sum",
                               label_smoothing=epsilon)
    expected_nll = F.cross_entropy(logits, target, ignore_index=0, reduction="sum")
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(nll.double(), expected_nll, rtol=1e-6, atol=1e-6)


def test_loss_by_hand():
    # Two classes, uniform logits: nll = log 2 for the one real token.
    loss, nll = label_smoothed_cross_entropy(torch.zeros(2, 2), torch.tensor([1, 0]), 0.1)
    assert nll.item() == pytest.approx(math.log(2))
    assert loss.item() == pytest.approx(math.log(2))


def naive_rdrop(logits, target, epsilon, alpha):
    """The R-Drop paper's objective (CE_1 + CE_2 + alpha/2 (KL_12 + KL_21)) summed over the
    real tokens, in float64 from torch's own losses, halved."""
    keep = target.ne(0)
    ce = sum(F.cross_entropy(x, target, ignore_index=0, reduction="sum", label_smoothing=epsilon)
             for x in logits)
    lp, lq = (F.log_softmax(x[keep], dim=-1) for x in logits)
    kl = (F.kl_div(lq, lp, log_target=True, reduction="sum")  # KL(p || q)
          + F.kl_div(lp, lq, log_target=True, reduction="sum"))
    return (ce + alpha / 2 * kl) / 2


def test_rdrop_loss_and_gradient_match_naive_float64():
    torch.manual_seed(0)
    logits = torch.randn(2, 12, 17, dtype=torch.float64, requires_grad=True)
    target = torch.randint(1, 17, (12,))
    target[[3, 7]] = 0  # padding
    loss, nll = rdrop_cross_entropy(logits, target, epsilon=0.1, alpha=5.0)
    expected = naive_rdrop(logits, target, 0.1, 5.0)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    expected_nll = sum(F.cross_entropy(x, target, ignore_index=0, reduction="sum")
                       for x in logits) / 2
    torch.testing.assert_close(nll.double(), expected_nll, rtol=1e-5, atol=1e-5)
    grad, = torch.autograd.grad(loss, logits)
    expected_grad, = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
    assert grad[:, [3, 7]].abs().max() == 0  # padding gets no gradient


def test_rdrop_of_two_equal_passes_is_the_plain_loss():
    torch.manual_seed(1)
    once = torch.randn(9, 11)
    target = torch.randint(0, 11, (9,))
    loss, nll = rdrop_cross_entropy(torch.stack([once, once]), target, 0.1, alpha=5.0)
    plain_loss, plain_nll = label_smoothed_cross_entropy(once, target, 0.1)
    torch.testing.assert_close((loss, nll), (plain_loss, plain_nll))


def test_inverse_sqrt_schedule():
    cfg = SchedConfig(name="inverse_sqrt", warmup_steps=4)
    factors = [lr_factor(s, cfg, 100, 1e-3) for s in (1, 2, 4, 16, 64)]
    assert factors == pytest.approx([0.25, 0.5, 1.0, 0.5, 0.25])


def test_cosine_schedule_ends_at_min_lr():
    cfg = SchedConfig(name="cosine", warmup_steps=10, min_lr=1e-5)
    assert lr_factor(10, cfg, 110, 1e-3) == pytest.approx(1.0)
    assert lr_factor(60, cfg, 110, 1e-3) == pytest.approx(0.5 + 0.5 * 1e-2)
    assert lr_factor(110, cfg, 110, 1e-3) == pytest.approx(1e-2)


def test_scheduler_drives_the_optimizer():
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3), torch.device("cpu"))
    scheduler = build_scheduler(optimizer, SchedConfig(warmup_steps=4), 100)
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.98)


def tiny_model(**changes) -> torch.nn.Module:
    """configs/model/tiny.yaml's model (2+2 layers, d 32) over 50 tokens a side."""
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=64,
                      dropout=0.0, max_len=64, share_embeddings="decoder")
    return build_model(dataclasses.replace(cfg, **changes), 50, 50)


def exempt_by_name(name: str) -> bool:
    """What the default optim.no_decay spares, from the model's naming alone: biases,
    LayerNorm gains (the modules are called ``norm`` or ``final_norm``), token and
    position tables."""
    module_name, _, leaf = name.rpartition(".")
    return (leaf == "bias" or module_name.split(".")[-1].endswith("norm")
            or module_name.endswith("embedding.tokens") or module_name.endswith("positions"))


@pytest.mark.parametrize("changes", [
    {}, {"share_embeddings": "all", "norm_first": True,
         "positional": components.entry("positional", "learned")},
    {"share_embeddings": "none"}], ids=["tiny", "tied-prenorm-learned", "untied"])
def test_weight_decay_spares_biases_norms_and_embeddings(changes):
    model = tiny_model(**changes)
    names = {id(p): name for name, p in model.named_parameters()}
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.1), torch.device("cpu"))
    decay, spared = ([names[id(p)] for p in group["params"]] for group in optimizer.param_groups)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0.0]
    assert set(spared) == {name for name in names.values() if exempt_by_name(name)}
    assert set(decay) == {name for name in names.values() if not exempt_by_name(name)}
    # What decays is exactly the matrices of the linear layers, and the output projection
    # only when it is not tied to the embeddings.
    linear = {f"{name}.weight" for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear)}
    tied = model.output_projection.weight is model.decoder.embedding.tokens.weight
    assert set(decay) == linear - ({"output_projection.weight"} if tied else set())
    assert ("output_projection.weight" in decay) == (changes.get("share_embeddings") == "none")


def test_a_zero_gradient_step_shrinks_the_matrices_and_leaves_the_rest():
    model = tiny_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    lr, weight_decay = 1e-2, 0.1
    optimizer = build_optimizer(model, OptimConfig(lr=lr, weight_decay=weight_decay),
                                torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # a None gradient would skip the parameter altogether
    optimizer.step()
    params = dict(model.named_parameters())
    for name in ("encoder.layers.0.self_attn.q_proj.bias", "decoder.layers.1.ff_block.norm.weight",
                 "encoder.embedding.tokens.weight"):
        assert torch.equal(params[name], before[name]), name
    matrix = "decoder.layers.0.feed_forward.linear1.weight"
    torch.testing.assert_close(params[matrix], before[matrix] * (1 - lr * weight_decay),
                               rtol=1e-6, atol=0)


def test_no_decay_takes_expressions_and_refuses_one_that_matches_nothing():
    model = tiny_model(share_embeddings="all")
    # The tied weight is both an embedding and output_projection.weight: either name spares it.
    assert no_decay_names(model, ["output_projection"]) == {"encoder.embedding.tokens.weight"}
    assert no_decay_names(model, ["^decoder\\..*bias$"]) == {
        name for name, _ in model.named_parameters()
        if name.startswith("decoder.") and name.endswith("bias")}
    with pytest.raises(ConfigError, match="optim.no_decay: 'embeding' is not one of"):
        build_optimizer(model, OptimConfig(weight_decay=0.1, no_decay=["embeding"]),
                        torch.device("cpu"))
    # Without weight decay there is one group, as in checkpoints from before optim.no_decay.
    assert len(build_optimizer(model, OptimConfig(), torch.device("cpu")).param_groups) == 1
    assert len(build_optimizer(model, OptimConfig(weight_decay=0.1, no_decay=[]),
                               torch.device("cpu")).param_groups) == 1
