"""The model against independent references: float64 naive math, torch's own modules,
hand-computed parameter counts, and invariances every correct Transformer has."""

import ctypes
import functools
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from transformer import (
    FeedForward,
    ModelConfig,
    MultiHeadAttention,
    PositionalEncoding,
    Transformer,
    build_model,
    count_parameters,
    keep_attention_weights,
)
from transformer.positional import sinusoids

PAD = 0


def naive_attention(mha: MultiHeadAttention, query, key, value, mask=None):
    """Multi-head attention written out in float64, head by head, from the weights."""
    def linear(x, layer):
        return x.double() @ layer.weight.double().T + layer.bias.double()

    q, k, v = linear(query, mha.q_proj), linear(key, mha.k_proj), linear(value, mha.v_proj)
    heads = []
    for h in range(mha.n_heads):
        cols = slice(h * mha.d_k, (h + 1) * mha.d_k)
        scores = q[..., cols] @ k[..., cols].transpose(-2, -1) / math.sqrt(mha.d_k)
        if mask is not None:
            head_mask = mask.expand(q.size(0), mha.n_heads, q.size(1), k.size(1))[:, h]
            scores = scores.masked_fill(~head_mask, float("-inf"))
        heads.append(scores.softmax(-1) @ v[..., cols])
    return linear(torch.cat(heads, dim=-1), mha.out_proj)


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    sizes = dict(d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=64,
                 dropout=0.0)
    sizes.update(overrides)
    return Transformer(23, 29, **sizes).eval()


@pytest.mark.parametrize("B,Tq,Tk,d,h", [(2, 5, 5, 16, 2), (3, 4, 7, 24, 3), (1, 1, 9, 8, 1)])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_paths_match_naive_float64(B, Tq, Tk, d, h, masked):
    torch.manual_seed(B * Tk + h)
    mha = MultiHeadAttention(d, h).double()
    query, key = torch.randn(B, Tq, d, dtype=torch.float64), torch.randn(B, Tk, d,
                                                                        dtype=torch.float64)
    mask = None
    if masked:  # random key padding, keeping at least one key per row
        mask = torch.rand(B, 1, 1, Tk) > 0.4
        mask[..., 0] = True
    fast = mha(query, key, key, mask)
    explicit, weights = mha(query, key, key, mask, need_weights=True)
    reference = naive_attention(mha, query, key, key, mask)
    torch.testing.assert_close(fast, reference)
    torch.testing.assert_close(explicit, reference)
    assert weights.shape == (B, h, Tq, Tk)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, h, Tq, dtype=torch.float64))


def test_attention_causal_flag_matches_explicit_mask():
    torch.manual_seed(1)
    mha = MultiHeadAttention(16, 4).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    torch.testing.assert_close(mha(x, x, x, is_causal=True), naive_attention(mha, x, x, x, causal))


def test_attention_equals_torch_multihead_attention():
    torch.manual_seed(2)
    d, h = 32, 4
    ours, theirs = MultiHeadAttention(d, h), torch.nn.MultiheadAttention(d, h, batch_first=True)
    with torch.no_grad():
        theirs.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight,
                                               ours.v_proj.weight]))
        theirs.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias,
                                             ours.v_proj.bias]))
        theirs.out_proj.weight.copy_(ours.out_proj.weight)
        theirs.out_proj.bias.copy_(ours.out_proj.bias)
    q, kv = torch.randn(3, 5, d), torch.randn(3, 8, d)
    padding = torch.zeros(3, 8, dtype=torch.bool)
    padding[1, 6:] = True
    expected, expected_weights = theirs(q, kv, kv, key_padding_mask=padding,
                                        average_attn_weights=False)
    out, weights = ours(q, kv, kv, ~padding[:, None, None, :], need_weights=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, expected_weights, atol=1e-5, rtol=1e-5)


def test_feed_forward_matches_formula():
    torch.manual_seed(3)
    ff = FeedForward(8, 16).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    expected = F.relu(x @ ff.linear1.weight.T + ff.linear1.bias) @ ff.linear2.weight.T \
        + ff.linear2.bias
    torch.testing.assert_close(ff(x), expected)
    for activation in ("gelu", "silu"):
        assert FeedForward(8, 16, activation=activation)(x.float()).shape == x.shape


def test_sinusoids_follow_the_papers_formula():
    table = sinusoids(50, 16)
    for pos in (0, 1, 7, 49):
        for i in range(8):
            angle = pos / 10000 ** (2 * i / 16)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    pe = PositionalEncoding(16, 50)
    x = torch.zeros(1, 5, 16)
    torch.testing.assert_close(pe(x, offset=3)[0], table[3:8])
    learned = PositionalEncoding(16, 50, kind="learned")
    assert learned.table.requires_grad and learned(x).shape == x.shape


def test_no_causal_leak():
    model = tiny()
    src = torch.randint(4, 23, (2, 7))
    tgt = torch.randint(4, 29, (2, 9))
    logits = model(src, tgt)
    for t in range(9):
        changed = tgt.clone()
        changed[:, t] = (changed[:, t] + 1 - 4) % 25 + 4
        new_logits = model(src, changed)
        torch.testing.assert_close(new_logits[:, :t], logits[:, :t])
        if t < 8:  # and the change does reach the later positions
            assert not torch.allclose(new_logits[:, t:], logits[:, t:])


@pytest.mark.parametrize("norm_first", [False, True])
def test_source_padding_does_not_change_logits(norm_first):
    model = tiny(norm_first=norm_first)
    src = torch.randint(4, 23, (2, 6))
    tgt = torch.randint(4, 29, (2, 5))
    padded = torch.cat([src, torch.full((2, 4), PAD)], dim=1)
    torch.testing.assert_close(model(padded, tgt), model(src, tgt), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
def test_incremental_decoding_equals_full_forward(norm_first):
    model = tiny(norm_first=norm_first)
    src = torch.randint(4, 23, (3, 8))
    src[0, 5:] = PAD  # a batch with padded sources
    src[2, 3:] = PAD
    tgt = torch.randint(4, 29, (3, 7))
    full = model(src, tgt)
    memory, src_padding_mask = model.encode(src)
    cache = model.new_cache()
    steps = [model.decode(tgt[:, t : t + 1], memory, src_padding_mask, cache) for t in range(7)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    # several new tokens at once after a cached prefix also match
    cache = model.new_cache()
    first = model.decode(tgt[:, :3], memory, src_padding_mask, cache)
    rest = model.decode(tgt[:, 3:], memory, src_padding_mask, cache)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_reorder_selects_rows():
    model = tiny()
    src = torch.randint(4, 23, (3, 5))
    tgt = torch.randint(4, 29, (3, 4))
    memory, mask = model.encode(src)
    cache = model.new_cache()
    model.decode(tgt[:, :3], memory, mask, cache)
    index = torch.tensor([2, 0])
    cache.reorder(index)
    step = model.decode(tgt[index, 3:], memory[index], mask[index], cache)
    torch.testing.assert_close(step, model(src[index], tgt[index])[:, 3:], atol=1e-5, rtol=1e-5)


def test_base_model_parameter_count():
    """Hand count for vocab 37000, shared: embeddings 18,944,000 + 6 encoder layers x
    3,152,384 + 6 decoder layers x 4,204,032 = 63,082,496 (Table 3 rounds to 65M)."""
    cfg = ModelConfig(d_model=512, n_heads=8, n_encoder_layers=6, n_decoder_layers=6,
                      d_ff=2048, dropout=0.1, share_embeddings="all")
    model = build_model(cfg, 37000, 37000)
    assert count_parameters(model) == 63_082_496
    assert model.output_projection.bias is None
    assert model.output_projection.weight is model.encoder.embedding.tokens.weight


def test_share_embeddings_variants():
    model = tiny(share_embeddings="decoder")
    assert model.output_projection.weight is model.decoder.embedding.tokens.weight
    assert model.encoder.embedding.tokens is not model.decoder.embedding.tokens
    model = tiny(share_embeddings="none")
    assert model.output_projection.weight is not model.decoder.embedding.tokens.weight


def test_initialization():
    model = Transformer(1000, 1000, d_model=64, n_heads=4, n_encoder_layers=1,
                        n_decoder_layers=1, d_ff=128)
    embedding = model.encoder.embedding.tokens.weight
    assert torch.all(embedding[PAD] == 0)
    assert embedding[1:].std().item() == pytest.approx(64**-0.5, rel=0.1)
    weight = model.encoder.layers[0].self_attn.q_proj.weight
    bound = math.sqrt(6 / (64 + 64))  # xavier uniform
    assert weight.abs().max() <= bound and weight.abs().max() > 0.9 * bound


def test_every_parameter_gets_a_gradient():
    model = tiny(share_embeddings="none",
                 positional=functools.partial(PositionalEncoding, kind="learned")).train()
    src, tgt = torch.randint(1, 23, (2, 6)), torch.randint(1, 29, (2, 5))
    model(src, tgt).sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = Transformer(20, 20, d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2,
                        d_ff=64, dropout=0.0)
    src, tgt = torch.randint(3, 20, (4, 6)), torch.randint(3, 20, (4, 7))
    tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss = F.cross_entropy(model(src, tgt_in).flatten(0, 1), tgt_out.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


def test_attention_maps_are_recorded():
    model = tiny()
    src, tgt = torch.randint(4, 23, (1, 6)), torch.randint(4, 29, (1, 5))
    with keep_attention_weights(model) as modules:
        model(src, tgt)
        cross = modules["decoder.layers.0.cross_attn"].last_weights
        self_weights = modules["decoder.layers.1.self_attn"].last_weights
    assert cross.shape == (1, 4, 5, 6)
    assert torch.all(self_weights.triu(1) == 0)  # causal


@pytest.mark.parametrize("kwargs,name", [
    (dict(d_model=30, n_heads=4), "d_model=30"),
    (dict(dropout=1.0), "dropout=1.0"),
    (dict(dropout=-0.1), "dropout=-0.1"),
    (dict(token_dropout=1.0), "token_dropout=1.0"),
    (dict(share_embeddings="encoder"), "share_embeddings='encoder'"),
    (dict(feed_forward=functools.partial(FeedForward, activation="tanh")), "activation='tanh'"),
])
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Transformer(10, 10, **{**dict(d_model=32, n_heads=4), **kwargs})


def test_share_all_needs_one_vocabulary():
    with pytest.raises(ValueError, match="src_vocab_size=10"):
        Transformer(10, 12, d_model=32, n_heads=4, share_embeddings="all")


def test_token_dropout_drops_whole_token_vectors():
    """Word dropout: a token's embedding is all zeros or all scaled by 1/(1-p); about p of
    the tokens are dropped; nothing changes in eval mode or before the positions."""
    torch.manual_seed(0)
    p = 0.25
    model = Transformer(50, 50, d_model=16, n_heads=2, n_encoder_layers=1, n_decoder_layers=1,
                        d_ff=32, dropout=0.0, token_dropout=p)
    embedding = model.encoder.embedding
    tokens = torch.randint(1, 50, (64, 40))
    plain = embedding.tokens(tokens) * embedding.scale  # (B, T, d), before the positions
    positions = embedding(tokens) - embedding.positions(torch.zeros_like(plain))
    embedding.eval()
    torch.testing.assert_close(embedding(tokens), embedding.positions(plain))
    embedding.train()
    dropped = positions.abs().amax(-1).eq(0)  # (B, T)
    kept = ~dropped
    torch.testing.assert_close(positions[kept], plain[kept] / (1 - p), rtol=1e-4, atol=1e-5)
    assert abs(dropped.float().mean().item() - p) < 0.03  # 2560 tokens: sd ~0.009
    assert model.decoder.embedding.token_dropout.dropout.p == p  # the target side too


def layer_calls(model: Transformer) -> list[int]:
    """A counter of forward calls of the first encoder and decoder layers (hooks)."""
    calls = [0]
    for layer in (model.encoder.layers[0], model.decoder.layers[0]):
        layer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("norm_first", [False, True])
def test_activation_checkpointing_gives_the_same_gradients_float64(norm_first):
    """With every dropout on: the recomputation in the backward must draw the masks of the
    forward (checkpoint keeps the RNG state), or the gradients would differ by far more."""
    gradients, calls = [], []
    for recompute in (False, True):
        model = tiny(norm_first=norm_first, dropout=0.2, attention_dropout=0.2,
                     activation_dropout=0.2, token_dropout=0.1).double().train()
        model.set_activation_checkpointing(recompute)
        counter = layer_calls(model)
        torch.manual_seed(1)
        src, tgt = torch.randint(1, 23, (3, 7)), torch.randint(1, 29, (3, 6))
        src[0, 4:] = PAD
        F.cross_entropy(model(src, tgt[:, :-1]).flatten(0, 1), tgt[:, 1:].flatten()).backward()
        gradients.append({name: p.grad for name, p in model.named_parameters()})
        calls.append(counter[0])
    assert calls == [2, 4]  # each checkpointed layer ran again in the backward
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, rtol=1e-12, atol=1e-12,
                                   msg=name)


def test_activation_checkpointing_only_where_a_backward_follows():
    model = tiny(dropout=0.1).train()
    model.set_activation_checkpointing(True)
    calls = layer_calls(model)
    src, tgt = torch.randint(1, 23, (2, 5)), torch.randint(1, 29, (2, 4))
    with torch.no_grad():
        model(src, tgt)
    model.eval()
    memory, src_padding_mask = model.encode(src)
    cache = model.new_cache()
    for t in range(4):  # incremental decoding: the cache grows once per step
        model.decode(tgt[:, t:t + 1], memory, src_padding_mask, cache)
    assert calls[0] == 2 + 1 + 4 and cache.length == 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallinfo2")
def test_activation_checkpointing_keeps_less_memory_for_the_backward(one_thread):
    """Bytes allocated (glibc's count, however torch keeps them) between the start of the
    forward and its end: the activations held for the backward. Checkpointed, each layer
    keeps only its input. Each setting's second step is measured: the first allocates
    lasting caches (about 20 MB the first time a checkpointed step runs)."""
    held = []
    for recompute in (False, True):
        model = tiny(d_model=64, n_encoder_layers=4, n_decoder_layers=4, d_ff=256,
                     dropout=0.1).train()
        model.set_activation_checkpointing(recompute)
        src, tgt = torch.randint(1, 23, (32, 48)), torch.randint(1, 29, (32, 48))
        for _ in range(2):
            before = allocated_bytes()
            logits = model(src, tgt)
            after_forward = allocated_bytes() - before - logits.nbytes
            logits.sum().backward()
        held.append(after_forward)
    assert held[1] < 0.1 * held[0], held


class MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def allocated_bytes() -> int:
    """Bytes the process has allocated through malloc now: heap blocks in use plus mmapped
    ones (torch's CPU tensors are among them)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_activation_checkpointing_lowers_the_peak_cuda_memory():
    peaks = []
    for recompute in (False, True):
        model = tiny(d_model=256, n_heads=4, n_encoder_layers=4, n_decoder_layers=4,
                     d_ff=1024, dropout=0.1).train().cuda()
        model.set_activation_checkpointing(recompute)
        src = torch.randint(1, 23, (64, 64), device="cuda")
        tgt = torch.randint(1, 29, (64, 64), device="cuda")
        model(src, tgt).float().logsumexp(-1).sum().backward()  # warm-up
        model.zero_grad(set_to_none=False)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        model(src, tgt).float().logsumexp(-1).sum().backward()
        peaks.append(torch.cuda.max_memory_allocated())
        del model
    assert peaks[1] < 0.6 * peaks[0], peaks
