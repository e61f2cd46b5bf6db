"""The model's parts as config groups (transformer/components.py): every entry of every
group, the paper's defaults, checkpoints written before the groups existed, one-line
errors at start-up, and what a checkpoint's config may make loading import."""

from __future__ import annotations

import functools
import sys
import textwrap

import pytest
import torch
from omegaconf import OmegaConf

from tests.test_cli import QUIET, run_in_process
from tests.test_train import compose_config
from transformer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from transformer.components import (
    PARTS,
    check_fine_tuning_parts,
    choices,
    entry,
    upgrade_model_config,
)
from transformer.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from transformer.feed_forward import FeedForward
from transformer.model import Transformer, build_model
from transformer.positional import PositionalEncoding

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
