"""evaluate.py, load_checkpoint and checkpoint averaging, on tiny checkpoints built here."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import make_toy_pairs
from transformer.checkpoint import (
    CheckpointError,
    average_checkpoints,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from transformer.config import ConfigError, DataConfig, EvalConfig, ModelConfig, TrainConfig
from transformer.decoding import translate
from transformer.ensemble import Ensemble
from transformer.evaluation import default_output_dir, evaluate, score
from transformer.model import build_model
from transformer.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = ModelConfig(d_model=32, n_heads=4, n_encoder_layers=1, n_decoder_layers=1, d_ff=64,
                   dropout=0.0, max_len=128, share_embeddings="decoder")


def make_checkpoint(path: Path, seed: int = 0, data: DataConfig | None = None) -> Path:
    torch.manual_seed(seed)
    src, tgt = make_toy_pairs(50)
    tokenizer = Tokenizer.train(src + tgt, vocab_size=300)
    model = build_model(TINY, tokenizer.vocab_size, tokenizer.vocab_size)
    config = TrainConfig(model=TINY, data=data or DataConfig())
    save_checkpoint({"model": model.state_dict(), "step": 1,
                     "config": OmegaConf.to_container(OmegaConf.structured(config)),
                     "tokenizer": {"src": tokenizer.to_str(), "tgt": None},
                     "vocab_size": {"src": tokenizer.vocab_size, "tgt": tokenizer.vocab_size}},
                    path)
    return path


def eval_config(**overrides) -> EvalConfig:
    return OmegaConf.structured(EvalConfig(**{"device": "cpu", "beam": 2,
                                              "max_len_b": 5, **overrides}))


def test_load_checkpoint_round_trip(tmp_path):
    path = make_checkpoint(tmp_path / "a.pt")
    model, tokenizer, cfg = load_checkpoint(path)
    assert not model.training and cfg.model.d_model == 32
    weights = read_checkpoint(path)["model"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    assert tokenizer.decode(tokenizer.encode("a dog runs.")) == "a dog runs."


def test_averaging_copies_and_pairs(tmp_path):
    a, b = make_checkpoint(tmp_path / "a.pt", seed=0), make_checkpoint(tmp_path / "b.pt", seed=1)
    same = average_checkpoints([a, a, a])["model"]
    original = read_checkpoint(a)["model"]
    for name in original:
        torch.testing.assert_close(same[name], original[name], rtol=0, atol=1e-7)
    mean = average_checkpoints([a, b])["model"]
    other = read_checkpoint(b)["model"]
    for name in original:
        torch.testing.assert_close(mean[name], (original[name] + other[name]) / 2)


def test_averaging_incompatible_checkpoints_fails(tmp_path):
    a = make_checkpoint(tmp_path / "a.pt")
    state = read_checkpoint(a)
    state["model"]["encoder.embedding.tokens.weight"] = torch.zeros(7, 32)
    save_checkpoint(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="bad.pt.*shape"):
        average_checkpoints([tmp_path / "bad.pt", a])


def test_average_script(tmp_path):
    a, b = make_checkpoint(tmp_path / "a.pt", seed=0), make_checkpoint(tmp_path / "b.pt", seed=1)
    result = subprocess.run([sys.executable, str(REPO / "scripts/average_checkpoints.py"),
                             "--inputs", str(a), str(b), "--output", str(tmp_path / "avg.pt")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    model, _, _ = load_checkpoint(tmp_path / "avg.pt")
    assert model is not None


def test_evaluate_averages_the_last_checkpoints_of_a_run(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    for step, seed in [(100, 3), (200, 0), (300, 1)]:
        make_checkpoint(checkpoints / f"checkpoint_{step}.pt", seed=seed)
    src, ref = make_toy_pairs(8, seed=5)
    (tmp_path / "src.en").write_text("".join(f"{line}\n" for line in src))
    (tmp_path / "ref.de").write_text("".join(f"{line}\n" for line in ref))
    files = {"mode": "files", "src_file": str(tmp_path / "src.en"),
             "ref_file": str(tmp_path / "ref.de")}
    averaged = evaluate(eval_config(checkpoint=str(tmp_path / "run"), average_last=2,
                                    output_dir=str(tmp_path / "averaged"), **files))
    subprocess.run([sys.executable, str(REPO / "scripts/average_checkpoints.py"), "--last", "2",
                    str(tmp_path / "run"), "--output", str(tmp_path / "avg.pt")], check=True)
    scripted = evaluate(eval_config(checkpoint=str(tmp_path / "avg.pt"),
                                    output_dir=str(tmp_path / "scripted"),
                                    scores_file=str(tmp_path / "scores.json"), **files))
    assert averaged == scripted == json.loads((tmp_path / "scores.json").read_text())
    assert (tmp_path / "averaged" / "src.en.hyp").read_text() == \
        (tmp_path / "scripted" / "src.en.hyp").read_text()
    with pytest.raises(CheckpointError, match="3 numbered checkpoints, fewer than the 4"):
        evaluate(eval_config(checkpoint=str(tmp_path / "run"), average_last=4, **files))


def test_evaluate_ensemble_decodes_the_members_together(tmp_path):
    a, b = make_checkpoint(tmp_path / "a.pt", seed=0), make_checkpoint(tmp_path / "b.pt", seed=1)
    src, ref = make_toy_pairs(8, seed=5)
    (tmp_path / "src.en").write_text("".join(f"{line}\n" for line in src))
    (tmp_path / "ref.de").write_text("".join(f"{line}\n" for line in ref))
    files = {"mode": "files", "src_file": str(tmp_path / "src.en"),
             "ref_file": str(tmp_path / "ref.de")}

    def hypotheses(checkpoint, ensemble=()):
        out = tmp_path / f"out_{len(list(tmp_path.iterdir()))}"
        evaluate(eval_config(checkpoint=str(checkpoint), ensemble=[str(e) for e in ensemble],
                             output_dir=str(out), **files))
        return (out / "src.en.hyp").read_text().splitlines()

    (model_a, tokenizer, _), (model_b, _, _) = load_checkpoint(a), load_checkpoint(b)
    expected = translate(Ensemble([model_a, model_b]), tokenizer, src, beam=2, max_len_b=5)
    assert hypotheses(a, [b]) == expected
    assert expected != translate(model_a, tokenizer, src, beam=2, max_len_b=5)
    assert hypotheses(a, [a]) == hypotheses(a)  # the mean of one distribution is itself
    assert default_output_dir(str(a), ensemble=True) == tmp_path / "translations_ensemble"


def test_evaluate_ensemble_refuses_other_directions_and_tokenizers(tmp_path):
    a = make_checkpoint(tmp_path / "a.pt")
    de_en = make_checkpoint(tmp_path / "de_en.pt", data=DataConfig(src_lang="de", tgt_lang="en"))
    with pytest.raises(CheckpointError, match="de_en.pt translates de -> en"):
        evaluate(eval_config(checkpoint=str(a), ensemble=[str(de_en)]))
    state = read_checkpoint(a)
    src, tgt = make_toy_pairs(50)
    state["tokenizer"] = {"src": Tokenizer.train(src + tgt, vocab_size=280).to_str(),
                          "tgt": None}
    save_checkpoint(state, tmp_path / "other_tokenizer.pt")
    with pytest.raises(CheckpointError, match="other_tokenizer.pt has another tokenizer"):
        evaluate(eval_config(checkpoint=str(a), ensemble=[str(tmp_path / "other_tokenizer.pt")]))


def test_interactive_mode_keeps_lines_and_empty_lines(tmp_path):
    path = make_checkpoint(tmp_path / "a.pt")
    out = io.StringIO()
    evaluate(eval_config(checkpoint=str(path), mode="interactive"),
             stdin=io.StringIO("a dog runs.\n\ntwo children play.\n"), stdout=out)
    lines = out.getvalue().split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[3] == ""


def test_files_mode_writes_hypotheses_and_scores(tmp_path, capsys):
    path = make_checkpoint(tmp_path / "a.pt")
    src, ref = make_toy_pairs(6, seed=5)
    (tmp_path / "in.en").write_text("\n".join(src) + "\n")
    (tmp_path / "ref.de").write_text("\n".join(ref) + "\n")
    results = evaluate(eval_config(checkpoint=str(path), mode="files",
                                   src_file=str(tmp_path / "in.en"),
                                   ref_file=str(tmp_path / "ref.de"), output_dir=str(tmp_path)))
    assert set(results["in.en"]) >= {"bleu", "bleu_lc", "chrf", "bleu_signature"}
    assert len((tmp_path / "in.en.hyp").read_text().splitlines()) == 6
    assert "BLEU" in capsys.readouterr().out


def test_translations_go_to_the_run_directory_by_default(tmp_path):
    path = make_checkpoint(tmp_path / "run" / "checkpoints" / "checkpoint_100.pt")
    src, ref = make_toy_pairs(4, seed=5)
    (tmp_path / "in.en").write_text("\n".join(src) + "\n")
    (tmp_path / "ref.de").write_text("\n".join(ref) + "\n")
    evaluate(eval_config(checkpoint=str(path), mode="files", src_file=str(tmp_path / "in.en"),
                         ref_file=str(tmp_path / "ref.de")))
    assert len((tmp_path / "run" / "translations" / "in.en.hyp").read_text().splitlines()) == 4
    translations = tmp_path / "run" / "translations"
    assert default_output_dir(str(tmp_path / "run")) == translations  # average_last's form
    assert default_output_dir(str(tmp_path / "run" / "checkpoints")) == translations
    assert default_output_dir(str(tmp_path / "avg.pt")) == tmp_path / "translations"


def test_splits_mode_reads_the_checkpoints_corpus(tmp_path, write_corpus):
    root = write_corpus({"test": make_toy_pairs(5, seed=7)})
    data = DataConfig(source="parallel_files", root=str(root))
    path = make_checkpoint(tmp_path / "a.pt", data=data)
    results = evaluate(eval_config(checkpoint=str(path), splits=["test"],
                                   output_dir=str(tmp_path)))
    assert list(results) == ["test.en-de"]
    with pytest.raises(Exception, match="splits found: test"):
        evaluate(eval_config(checkpoint=str(path), splits=["nope"], output_dir=str(tmp_path)))


def test_precision_sets_the_autocast_of_translation(tmp_path, monkeypatch):
    """precision=bf16 translates under CPU bf16 autocast, auto (on the CPU) in float32; a bad
    name is refused, naming the key, before the checkpoint is read."""
    path = make_checkpoint(tmp_path / "a.pt")
    seen = []
    original = load_checkpoint

    def load_and_watch(*args, **kwargs):
        model, tokenizer, cfg = original(*args, **kwargs)
        model.output_projection.register_forward_hook(
            lambda module, inputs, output: seen.append(output.dtype))
        return model, tokenizer, cfg

    monkeypatch.setattr("transformer.evaluation.load_checkpoint", load_and_watch)
    (tmp_path / "in.en").write_text("a dog runs.\n")
    for precision, dtype in [("bf16", torch.bfloat16), ("auto", torch.float32)]:
        seen.clear()
        evaluate(eval_config(checkpoint=str(path), mode="files", src_file=str(tmp_path / "in.en"),
                             output_dir=str(tmp_path), precision=precision))
        assert seen and set(seen) == {dtype}
    with pytest.raises(ConfigError, match="precision='bf32' is not one of"):
        evaluate(eval_config(checkpoint=str(tmp_path / "nope.pt"), precision="bf32"))


def test_score_is_sacrebleu():
    assert score(["a b c d"], ["a b c d"])["bleu"] == pytest.approx(100.0)
    assert score(["A B C D"], ["a b c d"])["bleu_lc"] == pytest.approx(100.0)
    assert "nrefs:1" in score(["x"], ["y"])["bleu_signature"]


def test_missing_and_mismatched_checkpoints_give_clear_errors(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "evaluate.py"),
                             f"checkpoint={tmp_path / 'nope.pt'}"], capture_output=True, text=True)
    assert result.returncode == 2 and "checkpoint not found" in result.stderr
    assert "Traceback" not in result.stderr
    state = read_checkpoint(make_checkpoint(tmp_path / "a.pt"))
    state["config"]["model"]["d_ff"] = 128  # the weights no longer fit the model code
    save_checkpoint(state, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="does not match the model code"):
        load_checkpoint(tmp_path / "mismatch.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "a.pt").read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated.pt is truncated or corrupt"):
        load_checkpoint(tmp_path / "truncated.pt")


def test_linked_checkpoint_survives_pruning_of_its_source(tmp_path):
    from transformer.checkpoint import link_checkpoint, prune_checkpoints

    numbered = make_checkpoint(tmp_path / "checkpoint_5.pt")
    make_checkpoint(tmp_path / "checkpoint_6.pt", seed=1)
    link_checkpoint(numbered, tmp_path / "checkpoint_last.pt")
    prune_checkpoints(tmp_path, keep_last=1)
    assert not numbered.exists() and (tmp_path / "checkpoint_6.pt").exists()
    kept = read_checkpoint(tmp_path / "checkpoint_last.pt")["model"]
    expected = torch.load(tmp_path / "checkpoint_6.pt", weights_only=True)["model"]
    assert any(not torch.equal(kept[k], expected[k]) for k in kept)  # it is step 5's
    assert not list(tmp_path.glob(".*tmp*"))
