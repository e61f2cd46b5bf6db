"""The model's parts as config groups (transformer/components.py): every entry of every
group, the paper's defaults, checkpoints written before the groups existed, one-line
errors at start-up, and what a checkpoint's config may make loading import."""

from __future__ import annotations

import cmath
import functools
import math
import sys
import textwrap

import pytest
import torch
from omegaconf import OmegaConf

from tests.test_cli import QUIET, run_in_process
from tests.test_train import compose_config
from transformer.alibi import ALiBiPositions, head_slopes
from transformer.attention import MultiHeadAttention
from transformer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from transformer.components import (
    PARTS,
    check_fine_tuning_parts,
    choices,
    entry,
    locate,
    upgrade_model_config,
)
from transformer.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from transformer.feed_forward import FeedForward
from transformer.model import Transformer, build_model
from transformer.positional import PositionalEncoding
from transformer.rmsnorm import RMSNorm
from transformer.rotary import RotaryPositions
from transformer.swiglu import SwiGLU

VOCAB = 31
SIZES = dict(d_model=16, n_heads=2, n_encoder_layers=2, n_decoder_layers=2, d_ff=32,
             dropout=0.0, max_len=64)


def test_train_yaml_defaults_are_the_papers_parts():
    """The defaults train.yaml picks build, weight for weight, the model that
    Transformer's own defaults (ModelConfig's None parts) build."""
    composed = compose_config(["model=tiny"])
    models = []
    for model_cfg in (OmegaConf.to_object(composed.model), ModelConfig(**{
            **vars(OmegaConf.to_object(composed.model)), **{part: None for part in PARTS}})):
        torch.manual_seed(0)
        models.append(build_model(model_cfg, VOCAB, VOCAB))
    (ours, papers), (ours_state, papers_state) = models, [m.state_dict() for m in models]
    assert ours_state.keys() == papers_state.keys()
    for name, tensor in papers_state.items():
        assert torch.equal(ours_state[name], tensor), name
    assert [type(m) for m in ours.modules()] == [type(m) for m in papers.modules()]
    assert {part: composed.model[part]["_target_"] for part in PARTS} == {
        "attention": "transformer.attention.MultiHeadAttention",
        "positional": "transformer.positional.PositionalEncoding",
        "norm": "torch.nn.LayerNorm", "ffn": "transformer.feed_forward.FeedForward"}


@pytest.mark.parametrize("part,name", [("positional", kind) for kind in
                                       ("sinusoidal", "sinusoidal_concat", "learned")]
                         + [("ffn", activation) for activation in ("relu", "gelu", "silu")])
def test_old_config_strings_become_the_entries_of_those_names(part, name):
    key = "positional" if part == "positional" else "activation"
    assert upgrade_model_config({key: name})[part] == entry(part, name)


def old_style_checkpoint(path, **model_changes) -> Transformer:
    """A checkpoint as the code before the config groups wrote it: ``positional`` and
    ``activation`` strings in its config, no attention/norm/ffn keys. Returns a model
    with its weights, built from factories given directly (not from that config)."""
    model_cfg = OmegaConf.to_container(OmegaConf.structured(ModelConfig(**SIZES)))
    for part in PARTS:
        del model_cfg[part]
    model_cfg.update(positional="learned", activation="gelu", norm_first=True, **model_changes)
    torch.manual_seed(0)
    model = Transformer(VOCAB, VOCAB, **SIZES, norm_first=True,
                        positional=functools.partial(PositionalEncoding, kind="learned"),
                        feed_forward=functools.partial(FeedForward, activation="gelu")).eval()
    config = OmegaConf.to_container(OmegaConf.structured(TrainConfig(data=DataConfig())))
    config["model"] = model_cfg
    tokenizer = make_tokenizer()
    save_checkpoint({"model": model.state_dict(), "step": 3, "config": config,
                     "tokenizer": {"src": tokenizer.to_str(), "tgt": None},
                     "vocab_size": {"src": VOCAB, "tgt": VOCAB}}, path)
    return model


@functools.cache
def make_tokenizer():
    from tests.conftest import make_toy_pairs
    from transformer.tokenizer import Tokenizer

    src, tgt = make_toy_pairs(30)
    return Tokenizer.train(src + tgt, vocab_size=VOCAB)


def test_an_old_checkpoint_loads_and_computes_the_same(tmp_path):
    reference = old_style_checkpoint(tmp_path / "old.pt")
    model, _, cfg = load_checkpoint(tmp_path / "old.pt")
    assert cfg.model.positional.kind == "learned" and cfg.model.ffn.activation == "gelu"
    assert "activation" not in cfg.model
    src, tgt = torch.randint(4, VOCAB, (2, 7)), torch.randint(4, VOCAB, (2, 5))
    with torch.no_grad():
        assert torch.equal(model(src, tgt), reference(src, tgt))


@pytest.mark.parametrize("override,message", [
    ("model/ffn=swiglo", "error: model/ffn=swiglo: no such option in configs/model/ffn/; "
                         f"choose one of {', '.join(choices('ffn'))}"),
    ("+model.ffn.activaton=gelu", "error: model.ffn.activaton is not a parameter of "
                                  "transformer.feed_forward.FeedForward (its parameters: "
                                  "d_model, d_ff, dropout, activation); did you mean "
                                  "model.ffn.activation?"),
    ("model.ffn.activation=tanh", "error: model.ffn (transformer.feed_forward.FeedForward): "
                                  "activation='tanh' is not one of ['gelu', 'relu', 'silu']"),
    ("model.attention=abc", "error: model.attention: Cannot assign str to Dict[str, Any] "
                            "(pick an entry: model/attention=NAME)"),
    ("model.norm._target_=no_such_pkg.Norm", "error: model.norm._target_=no_such_pkg.Norm: "
                                             "cannot import no_such_pkg (No module named "
                                             "'no_such_pkg'); install its package or put its "
                                             "folder on PYTHONPATH"),
    ("model.norm._target_=os.system", "error: model.norm._target_=os.system is not an "
                                      "nn.Module class"),
])
def test_a_bad_part_stops_train_py_in_one_line(override, message, tmp_path, monkeypatch,
                                               capsys):
    run_dir = tmp_path / "run"
    status, out, err = run_in_process("train.py", ["model=tiny", override, *QUIET,
                                                   f"hydra.run.dir={run_dir}"],
                                      tmp_path, monkeypatch, capsys)
    assert status == 2 and err == f"{message}\n", err
    assert not (run_dir / "checkpoints").exists()


# ---------------------------------------------------------------------------------- trust


@pytest.fixture
def noisy_module(tmp_path, monkeypatch):
    """An importable module ``noisy_parts`` whose import leaves a file behind (the stand-in
    for code that a checkpoint must not run), holding an attention class."""
    marker = tmp_path / "imported"
    (tmp_path / "noisy_parts.py").write_text(textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("ran")
        from transformer.attention import MultiHeadAttention
        class Attention(MultiHeadAttention):
            pass
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    sys.modules.pop("noisy_parts", None)


def test_a_checkpoint_imports_only_trusted_modules(noisy_module, tmp_path):
    model_cfg = ModelConfig(**SIZES, attention={"_target_": "noisy_parts.Attention",
                                                "_partial_": True})
    torch.manual_seed(0)
    model = build_model(model_cfg, VOCAB, VOCAB)
    noisy_module.unlink()
    sys.modules.pop("noisy_parts")
    config = OmegaConf.to_container(OmegaConf.structured(TrainConfig(model=model_cfg)))
    tokenizer = make_tokenizer()
    path = tmp_path / "noisy.pt"
    save_checkpoint({"model": model.state_dict(), "step": 1, "config": config,
                     "tokenizer": {"src": tokenizer.to_str(), "tgt": None},
                     "vocab_size": {"src": VOCAB, "tgt": VOCAB}}, path)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    message = str(refused.value)
    assert "model.attention._target_=noisy_parts.Attention" in message and "\n" not in message
    assert "trust_modules=[noisy_parts]" in message
    assert not noisy_module.exists() and "noisy_parts" not in sys.modules  # nothing ran
    loaded, _, _ = load_checkpoint(path, trust_modules=["noisy_parts"])
    assert type(loaded.encoder.layers[0].self_attn).__name__ == "Attention"
    assert noisy_module.exists()


@pytest.mark.parametrize("target,message", [
    ("os.system", "a checkpoint may name classes of transformer and torch.nn only"),
    ("subprocess.Popen", "a checkpoint may name classes of transformer and torch.nn only"),
    # inside the package's prefix, but not a class of it: never called
    ("transformer.checkpoint.os.system", "cannot import transformer.checkpoint.os"),
    ("transformer.checkpoint.load_checkpoint", "is not an nn.Module class"),
])
def test_a_checkpoint_cannot_name_a_function_to_call(target, message, tmp_path):
    old_style_checkpoint(tmp_path / "a.pt",
                         norm={"_target_": target, "_partial_": True, "command": "touch x"})
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "a.pt")
    assert not (tmp_path / "x").exists()


def test_fine_tuning_trusts_what_the_runs_own_config_names():
    theirs = {"attention": {"_target_": "my_pkg.qk_norm.QKNormAttention", "_partial_": True}}
    with pytest.raises(ConfigError, match="trainer.init_from: model.attention._target_="
                                          "my_pkg.qk_norm.QKNormAttention"):
        check_fine_tuning_parts(theirs, {"attention": entry("attention", "mha")})
    check_fine_tuning_parts(theirs, theirs)
    check_fine_tuning_parts({"attention": entry("attention", "mha")}, {})


# ------------------------------------------------------------ every entry of every group

ENTRIES = [(part, name) for part in PARTS for name in choices(part)]
ENTRY_IDS = [f"{part}={name}" for part, name in ENTRIES]


def entry_config(part: str, name: str) -> ModelConfig:
    """A tiny pre-norm model (the final norm is the part too) with one part swapped."""
    return ModelConfig(**SIZES, norm_first=True, share_embeddings="decoder",
                       **{part: entry(part, name)})


@functools.cache
def entry_model(part: str, name: str) -> Transformer:
    torch.manual_seed(0)
    model = build_model(entry_config(part, name), VOCAB, VOCAB).eval()
    with torch.no_grad():  # non-trivial norm gains and biases, as after some training
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def source_and_target() -> tuple[torch.Tensor, torch.Tensor]:
    """Two sources (the second right-padded) and two target prefixes starting with BOS."""
    generator = torch.Generator().manual_seed(1)
    src = torch.randint(4, VOCAB, (2, 9), generator=generator)
    src[1, 6:] = 0
    tgt = torch.randint(4, VOCAB, (2, 7), generator=generator)
    tgt[:, 0] = 1
    return src, tgt


def test_every_entry_is_tested():
    built_in = {"attention": {"mha"}, "positional": {"sinusoidal", "sinusoidal_concat",
                                                     "learned", "rope", "alibi"},
                "norm": {"layernorm", "rmsnorm"}, "ffn": {"relu", "gelu", "silu", "swiglu"}}
    assert {part: set(choices(part)) for part in PARTS} == built_in


@pytest.mark.parametrize("part,name", ENTRIES, ids=ENTRY_IDS)
def test_the_entry_builds_its_class(part, name):
    model = entry_model(part, name)
    target = entry(part, name)["_target_"]
    module = {"attention": model.decoder.layers[0].self_attn,
              "positional": model.decoder.embedding.positions,
              "norm": model.decoder.final_norm,
              "ffn": model.decoder.layers[0].feed_forward}[part]
    assert type(module) is locate(target, part)


@pytest.mark.parametrize("part,name", ENTRIES, ids=ENTRY_IDS)
def test_incremental_decoding_equals_the_full_forward(part, name):
    """With the cache: three tokens at once, then one at a time (offsets of RoPE, ALiBi's
    query positions, sinusoids from the cache's length)."""
    model = entry_model(part, name)
    src, tgt = source_and_target()
    with torch.no_grad():
        memory, src_padding_mask = model.encode(src)
        full = model.decode(tgt, memory, src_padding_mask)
        cache = model.new_cache()
        steps = [model.decode(tgt[:, :3], memory, src_padding_mask, cache)]
        steps += [model.decode(tgt[:, t:t + 1], memory, src_padding_mask, cache)
                  for t in range(3, tgt.size(1))]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("part,name", ENTRIES, ids=ENTRY_IDS)
def test_padding_changes_no_output(part, name):
    """A pair alone, and padded at the end of both sides beside a longer pair."""
    model = entry_model(part, name)
    src, tgt = source_and_target()
    alone_src, alone_tgt = src[1:, :6], tgt[1:, :4]
    padded_tgt = tgt.clone()
    padded_tgt[1, 4:] = 0
    with torch.no_grad():
        alone = model(alone_src, alone_tgt)
        batched = model(src, padded_tgt)[1:, :4]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("part,name", ENTRIES, ids=ENTRY_IDS)
def test_the_explicit_path_equals_the_fused_one(part, name):
    """Attention maps take the seed's step-by-step path; the model's outputs must not
    change with it (ALiBi's bias goes to the fused kernel as an additive mask)."""
    from transformer.model import keep_attention_weights

    model = entry_model(part, name)
    src, tgt = source_and_target()
    with torch.no_grad():
        fused = model(src, tgt)
        with keep_attention_weights(model) as modules:
            explicit = model(src, tgt)
    assert modules
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("part,name", ENTRIES, ids=ENTRY_IDS)
def test_a_checkpoint_round_trips(part, name, tmp_path):
    model = entry_model(part, name)
    config = OmegaConf.to_container(OmegaConf.structured(TrainConfig(
        model=entry_config(part, name))))
    tokenizer = make_tokenizer()
    save_checkpoint({"model": model.state_dict(), "step": 1, "config": config,
                     "tokenizer": {"src": tokenizer.to_str(), "tgt": None},
                     "vocab_size": {"src": VOCAB, "tgt": VOCAB}}, tmp_path / "c.pt")
    loaded, _, cfg = load_checkpoint(tmp_path / "c.pt")
    assert OmegaConf.to_container(cfg.model[part]) == entry(part, name)
    src, tgt = source_and_target()
    with torch.no_grad():
        assert torch.equal(loaded(src, tgt), model(src, tgt))


@pytest.mark.parametrize("part,name", ENTRIES, ids=ENTRY_IDS)
def test_one_training_step_moves_every_parameter(part, name):
    from transformer.config import OptimConfig, SchedConfig
    from transformer.data import Batch
    from transformer.optim import build_optimizer, build_scheduler
    from transformer.precision import Precision
    from transformer.trainer import train_step

    torch.manual_seed(0)
    model = build_model(replace_dropout(entry_config(part, name), 0.1), VOCAB, VOCAB).train()
    src, tgt = source_and_target()
    batch = Batch(src_tokens=src, tgt_input=tgt[:, :-1], tgt_output=tgt[:, 1:], indices=[0, 1],
                  n_src_tokens=int(src.ne(0).sum()), n_tgt_tokens=int(tgt[:, 1:].ne(0).sum()))
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2), torch.device("cpu"))
    scheduler = build_scheduler(optimizer, SchedConfig(name="constant", warmup_steps=0), 10)
    precision = Precision.resolve("fp32", torch.device("cpu"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    output = train_step(model, [batch], optimizer, precision.grad_scaler(), precision,
                        clip_norm=1.0, label_smoothing=0.1)
    scheduler.step()
    assert torch.isfinite(output.loss_sum) and bool(output.finite)
    for parameter_name, parameter in model.named_parameters():
        assert not torch.equal(parameter, before[parameter_name]), parameter_name


def replace_dropout(cfg: ModelConfig, p: float) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(cfg, dropout=p, attention_dropout=p, activation_dropout=p)


@pytest.mark.parametrize("part,name", ENTRIES, ids=ENTRY_IDS)
def test_beam_search_translates_the_same_with_and_without_the_cache(part, name):
    from transformer.decoding import beam_search

    model = entry_model(part, name)
    src, _ = source_and_target()
    cached, recomputed = (beam_search(model, src, beam=3, max_len_b=6, use_cache=use_cache)
                          for use_cache in (True, False))
    for with_cache, without in zip(cached, recomputed, strict=True):
        assert with_cache[0].tokens == without[0].tokens and len(with_cache[0].tokens) <= 16
        assert with_cache[0].score == pytest.approx(without[0].score, abs=1e-4)


# ------------------------------------------------- the new parts against their papers


def naive_rotation(x: torch.Tensor, positions: list[int], base: float = 10000.0
                   ) -> torch.Tensor:
    """RoFormer's equation (34) with Python complex numbers, pair by pair: x (T, d_k)."""
    x = x.detach()
    out, d_k = x.clone(), x.size(-1)
    for t, position in enumerate(positions):
        for i in range(d_k // 2):
            turned = complex(x[t, 2 * i], x[t, 2 * i + 1]) * cmath.exp(
                1j * position * base ** (-2 * i / d_k))
            out[t, 2 * i], out[t, 2 * i + 1] = turned.real, turned.imag
    return out


@pytest.mark.parametrize("d_k,offset", [(8, 0), (8, 37), (7, 5)])
def test_rope_rotates_pairs_as_complex_numbers(d_k, offset):
    q, k = torch.randn(2, 3, 4, d_k, dtype=torch.float64).unbind(0)  # (h, T, d_k) each
    rotated_q, rotated_k = RotaryPositions(16, 64).rotate(q[None], k[None], offset)
    positions = list(range(offset, offset + 4))
    for head in range(3):
        torch.testing.assert_close(rotated_q[0, head], naive_rotation(q[head], positions),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rotated_k[0, head], naive_rotation(k[head], positions),
                                   atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_on_relative_positions_only():
    rope = RotaryPositions(16, 64)
    q, k = torch.randn(2, 1, 1, 1, 8, dtype=torch.float64).unbind(0)

    def score(query_position: int, key_position: int) -> float:
        rotated_q, _ = rope.rotate(q, q, query_position)
        _, rotated_k = rope.rotate(k, k, key_position)
        return float((rotated_q * rotated_k).sum())

    assert score(9, 4) == pytest.approx(score(30, 25), abs=1e-5)
    assert score(9, 4) != pytest.approx(score(9, 5), abs=1e-3)


@pytest.mark.parametrize("n_heads,expected", [
    (8, [2 ** -i for i in range(1, 9)]),  # the paper's example, section 3
    (16, [2 ** (-i / 2) for i in range(1, 17)]),
    (6, [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]),  # the authors' code
])
def test_alibi_slopes_are_the_papers(n_heads, expected):
    assert head_slopes(n_heads) == pytest.approx(expected)


def naive_self_attention(mha: MultiHeadAttention, x: torch.Tensor, mask: torch.Tensor,
                         rope: bool, alibi: bool) -> torch.Tensor:
    """Self-attention in float64 head by head, with positions applied by the formulas:
    RoPE by ``naive_rotation``, ALiBi as -slope * |i - j| added to the scaled scores."""
    def linear(y, layer):
        return y @ layer.weight.T + layer.bias

    q, k, v = linear(x, mha.q_proj), linear(x, mha.k_proj), linear(x, mha.v_proj)
    T, out = x.size(1), []
    slopes = head_slopes(mha.n_heads)
    for b in range(x.size(0)):
        heads = []
        for h in range(mha.n_heads):
            cols = slice(h * mha.d_k, (h + 1) * mha.d_k)
            qh, kh = q[b, :, cols], k[b, :, cols]
            if rope:
                qh, kh = naive_rotation(qh, list(range(T))), naive_rotation(kh, list(range(T)))
            scores = qh @ kh.T / math.sqrt(mha.d_k)
            if alibi:
                scores = scores - slopes[h] * (torch.arange(T)[:, None] - torch.arange(T)).abs()
            scores = scores.masked_fill(~mask[b], float("-inf"))
            heads.append(scores.softmax(-1) @ v[b, :, cols])
        out.append(torch.cat(heads, dim=-1))
    return linear(torch.stack(out), mha.out_proj)


@pytest.mark.parametrize("positions", ["rope", "alibi"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_with_positions_matches_a_naive_reference(positions, causal):
    torch.manual_seed(0)
    module = RotaryPositions(24, 64) if positions == "rope" else ALiBiPositions(24, 64)
    mha = MultiHeadAttention(24, 3, positions=module).double().eval()
    x = torch.randn(2, 6, 24, dtype=torch.float64)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True  # the second sequence is right-padded
    mask = (~padding)[:, None, :].expand(2, 6, 6)  # (B, Tq, Tk)
    if causal:
        mask = mask & torch.ones(6, 6, dtype=torch.bool).tril()
    out = mha(x, x, x, (~padding)[:, None, None, :], is_causal=causal)
    expected = naive_self_attention(mha, x, mask, rope=positions == "rope",
                                    alibi=positions == "alibi")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_rmsnorm_follows_the_formula():
    torch.manual_seed(0)
    norm = RMSNorm(8, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 8, dtype=torch.float64) * 3
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    theirs = torch.nn.RMSNorm(8, eps=1e-6).double()  # torch's own, an independent one
    theirs.load_state_dict(norm.state_dict())
    torch.testing.assert_close(theirs(x), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 in, bf16 out, float32 inside
        low = norm.float()(x.bfloat16())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.double(), expected, atol=0.05, rtol=0.02)


def test_swiglu_follows_the_formula():
    torch.manual_seed(0)
    ffn = SwiGLU(8, 12).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    gate = x @ ffn.gate.weight.T  # x W
    expected = (gate * torch.sigmoid(gate) * (x @ ffn.up.weight.T)) @ ffn.down.weight.T
    torch.testing.assert_close(ffn(x), expected)
    assert sum(p.numel() for p in ffn.parameters()) == 3 * 8 * 12  # no biases
