"""evaluate.py, load_checkpoint and checkpoint averaging, on tiny checkpoints built here."""

from __future__ import annotations

import io
import json
import os
import re
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
from transformer.data import DataError
from transformer.ensemble import Ensemble
from transformer.evaluation import default_output_dir, evaluate, score
from transformer.model import build_model
from transformer.tokenizer import Tokenizer
from transformer.translation import translate

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


def hyp_file(directory: Path, name: str) -> Path:
    """The one translations file of ``name`` in ``directory`` (its settings in its name)."""
    (path,) = directory.glob(f"{name}.*.hyp")
    return path


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
    assert hyp_file(tmp_path / "averaged", "src.en").read_text() == \
        hyp_file(tmp_path / "scripted", "src.en").read_text()


def test_averaging_more_than_a_run_saved_averages_what_it_has(tmp_path, caplog):
    """The command a training run prints last (average_last=10) works for a run that kept
    fewer checkpoints: it averages those, and says how many. None at all is an error."""
    checkpoints = tmp_path / "run" / "checkpoints"
    for step, seed in [(100, 3), (200, 0), (300, 1)]:
        make_checkpoint(checkpoints / f"checkpoint_{step}.pt", seed=seed)
    (tmp_path / "src.en").write_text("a dog runs.\ntwo children play.\n")
    files = {"mode": "files", "src_file": str(tmp_path / "src.en")}
    evaluate(eval_config(checkpoint=str(tmp_path / "run"), average_last=3,
                         output_dir=str(tmp_path / "three"), **files))
    with caplog.at_level("WARNING", logger="transformer.checkpoint"):
        evaluate(eval_config(checkpoint=str(tmp_path / "run"), average_last=10,
                             output_dir=str(tmp_path / "ten"), **files))
    assert hyp_file(tmp_path / "ten", "src.en").read_text() == \
        hyp_file(tmp_path / "three", "src.en").read_text()
    assert "has 3 numbered checkpoints, fewer than the 10 asked for: averaging those 3" \
        in caplog.text
    for old in checkpoints.iterdir():
        old.unlink()
    with pytest.raises(CheckpointError, match="has no numbered checkpoints"):
        evaluate(eval_config(checkpoint=str(tmp_path / "run"), average_last=10, **files))


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
        return hyp_file(out, "src.en").read_text().splitlines()

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
    assert len(hyp_file(tmp_path, "in.en").read_text().splitlines()) == 6
    assert "BLEU" in capsys.readouterr().out


def test_files_mode_refuses_empty_files(tmp_path):
    """sacreBLEU cannot score zero sentences (it raised an IndexError): a clear DataError,
    which evaluate.py prints as one error line."""
    path = make_checkpoint(tmp_path / "a.pt")
    (tmp_path / "in.en").write_text("")
    (tmp_path / "ref.de").write_text("")
    for ref_file in [str(tmp_path / "ref.de"), None]:
        with pytest.raises(DataError, match="in.en is empty: no line to translate"):
            evaluate(eval_config(checkpoint=str(path), mode="files", ref_file=ref_file,
                                 src_file=str(tmp_path / "in.en"), output_dir=str(tmp_path)))
    assert not list(tmp_path.glob("*.hyp"))


def test_files_mode_cuts_a_line_longer_than_max_len(tmp_path, caplog):
    """One output line per input line; the long one (TINY.max_len=128 tokens) translated
    from its first 127 tokens with a warning naming the line, as if cut by hand."""
    path = make_checkpoint(tmp_path / "a.pt")
    model, tokenizer, _ = load_checkpoint(path)
    long_line = " ".join(["a dog runs on the grass"] * 40)
    cut = tokenizer.decode(tokenizer.encode(long_line)[:127])
    (tmp_path / "in.en").write_text(f"a dog runs.\n{long_line}\n\ntwo children play.\n")
    with caplog.at_level("WARNING", logger="transformer"):
        evaluate(eval_config(checkpoint=str(path), mode="files",
                             src_file=str(tmp_path / "in.en"), output_dir=str(tmp_path)))
    assert "line 2: " in caplog.text and "max_len=128" in caplog.text
    assert hyp_file(tmp_path, "in.en").read_text().split("\n") == translate(
        model, tokenizer, ["a dog runs.", cut, "", "two children play."], beam=2,
        max_len_b=5) + [""]


def test_interactive_mode_survives_long_lines_and_bytes_that_are_not_utf8(tmp_path):
    """Through the real stdin of evaluate.py: a line that is not UTF-8 gets an empty output
    line and a warning, a long one is cut, and the lines after them are translated (each
    used to end the run with a traceback)."""
    path = make_checkpoint(tmp_path / "a.pt")
    long_line = " ".join(["a dog runs on the grass"] * 40).encode()
    lines = [b"a dog runs.", long_line, b"two \xff\xfe children.", b"", b"two children play."]
    result = subprocess.run(
        [sys.executable, str(REPO / "evaluate.py"), f"checkpoint={path}", "mode=interactive",
         "device=cpu", "beam=2", "max_len_b=5"], input=b"\n".join(lines) + b"\r\n",
        capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    outputs = result.stdout.decode().split("\n")
    assert len(outputs) == 6 and outputs[5] == ""
    model, tokenizer, _ = load_checkpoint(path)
    assert outputs[2] == outputs[3] == "" and outputs[1] != ""
    assert [outputs[0], outputs[4]] == translate(
        model, tokenizer, ["a dog runs.", "two children play."], beam=2, max_len_b=5)
    assert "line 2: " in stderr and "max_len=128" in stderr
    assert "line 3: bytes that are not UTF-8 (b'\\xff\\xfe c')" in stderr
    assert "Traceback" not in stderr


def test_translations_go_to_the_run_directory_by_default(tmp_path):
    path = make_checkpoint(tmp_path / "run" / "checkpoints" / "checkpoint_100.pt")
    src, ref = make_toy_pairs(4, seed=5)
    (tmp_path / "in.en").write_text("\n".join(src) + "\n")
    (tmp_path / "ref.de").write_text("\n".join(ref) + "\n")
    evaluate(eval_config(checkpoint=str(path), mode="files", src_file=str(tmp_path / "in.en"),
                         ref_file=str(tmp_path / "ref.de")))
    translations = tmp_path / "run" / "translations"
    assert len(hyp_file(translations, "in.en").read_text().splitlines()) == 4
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


def test_evaluations_with_other_settings_keep_their_own_files(tmp_path):
    """Two evaluations of one run used to overwrite translations/<split>.hyp: the file name
    now carries the settings that change the translations."""
    checkpoints = tmp_path / "run" / "checkpoints"
    for step, seed in [(100, 0), (200, 1)]:
        make_checkpoint(checkpoints / f"checkpoint_{step}.pt", seed=seed)
    (tmp_path / "in.en").write_text("a dog runs.\ntwo children play.\n")
    files = {"mode": "files", "src_file": str(tmp_path / "in.en"), "max_len_b": 10}
    evaluations = [
        ({"checkpoint": str(checkpoints / "checkpoint_200.pt"), "beam": 1},
         "translations/in.en.beam1.lenpen0.6.checkpoint_200.hyp"),
        ({"checkpoint": str(checkpoints / "checkpoint_200.pt"), "beam": 3},
         "translations/in.en.beam3.lenpen0.6.checkpoint_200.hyp"),
        ({"checkpoint": str(checkpoints / "checkpoint_100.pt"), "beam": 3},
         "translations/in.en.beam3.lenpen0.6.checkpoint_100.hyp"),
        ({"checkpoint": str(tmp_path / "run"), "average_last": 2, "lenpen": 1.4},
         "translations/in.en.beam2.lenpen1.4.avg2.hyp"),
        ({"checkpoint": str(checkpoints / "checkpoint_200.pt"), "min_len": 0,
          "max_len_b": 5, "precision": "bf16",
          "ensemble": [str(checkpoints / "checkpoint_100.pt")]},
         "translations_ensemble/in.en.beam2.lenpen0.6.maxlen1.2x+5.minlen0.bf16"
         ".checkpoint_200.ens2.hyp"),
    ]
    contents = {}
    for overrides, name in evaluations:
        evaluate(eval_config(**{**files, **overrides}))
        contents[name] = (tmp_path / "run" / name).read_text()
    for name, text in contents.items():  # each evaluation's file is still there, unchanged
        assert (tmp_path / "run" / name).read_text() == text
        assert len(text.splitlines()) == 2
    assert len(list((tmp_path / "run").glob("translations*/*.hyp"))) == len(evaluations)


def test_readme_python_snippet_runs_on_this_machine(tmp_path):
    """The README's "From Python" snippet, with a tiny checkpoint in place of
    checkpoint_best.pt: it must run on a CPU-only install (it used to pass device="cuda")."""
    readme = (REPO / "README.md").read_text()
    evaluation = readme[readme.index("## Evaluation"):]
    snippet = evaluation[evaluation.index("From Python:"):].split("```python\n")[1]
    snippet = snippet[: snippet.index("```")]
    assert '"checkpoint_best.pt"' in snippet
    path = make_checkpoint(tmp_path / "checkpoint_best.pt")
    *statements, last = snippet.strip().split("\n")
    namespace: dict = {}
    exec("\n".join(statements).replace('"checkpoint_best.pt"', repr(str(path))), namespace)
    outputs = eval(last, namespace)
    assert isinstance(outputs, list) and len(outputs) == 1 and isinstance(outputs[0], str)
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(namespace["model"].parameters()).device.type == expected_device


def files_mode(tmp_path, lines: list[str], **overrides) -> EvalConfig:
    """A files-mode config over ``lines`` written to in.en, output in ``tmp_path``."""
    (tmp_path / "in.en").write_text("".join(line + "\n" for line in lines))
    return eval_config(mode="files", src_file=str(tmp_path / "in.en"), output_dir=str(tmp_path),
                       **overrides)


def test_nbest_writes_json_lines_beside_the_best_translations(tmp_path):
    path = make_checkpoint(tmp_path / "a.pt")
    lines = ["a dog runs.", "", "two children play."]
    evaluate(files_mode(tmp_path, lines, checkpoint=str(path), beam=3, nbest=3,
                        token_scores=True))
    (jsonl,) = tmp_path.glob("in.en.beam3.lenpen0.6.*.nbest.jsonl")
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(r["id"], r["rank"]) for r in records] == [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0),
                                                       (2, 1), (2, 2)]
    best = [r["hypothesis"] for r in records if r["rank"] == 0]
    assert hyp_file(tmp_path, "in.en").read_text().splitlines() == best
    model, tokenizer, _ = load_checkpoint(path)
    assert best == translate(model, tokenizer, lines, beam=3, max_len_b=5)
    for sentence in (0, 2):
        ranked = [r for r in records if r["id"] == sentence]
        assert [r["normalized_score"] for r in ranked] == sorted(
            (r["normalized_score"] for r in ranked), reverse=True)
        for r in ranked:
            assert len(r["tokens"]) == len(r["token_scores"]) and r["tokens"][-1] == "</s>"
            assert r["score"] == pytest.approx(sum(r["token_scores"]), abs=1e-4)
            assert r["normalized_score"] == pytest.approx(
                r["score"] / len(r["token_scores"]) ** 0.6, abs=1e-5)
    assert records[3] == {"id": 1, "rank": 0, "hypothesis": "", "score": 0.0,
                          "normalized_score": 0.0, "tokens": [], "token_scores": []}


def test_sampling_is_seeded_and_named_by_its_settings(tmp_path):
    path = make_checkpoint(tmp_path / "a.pt")
    lines = ["a dog runs.", "two children play.", "a man rides a bike."]
    outputs = {}
    for seed, run in [(3, "a"), (3, "b"), (4, "c")]:
        out = tmp_path / run
        out.mkdir()
        evaluate(files_mode(out, lines, checkpoint=str(path), search="sample", top_p=0.95,
                            seed=seed, max_len_b=8))
        outputs[run] = (out / f"in.en.sample.topp0.95.seed{seed}.maxlen1.2x+8.a.hyp").read_text()
    assert outputs["a"] == outputs["b"] and outputs["a"] != outputs["c"]


def test_prefix_and_prefix_file_start_the_translations(tmp_path):
    path = make_checkpoint(tmp_path / "a.pt")
    model, tokenizer, _ = load_checkpoint(path)
    lines = ["a dog runs.", "two children play."]
    evaluate(files_mode(tmp_path, lines, checkpoint=str(path), prefix="ein hund",
                        no_repeat_ngram_size=2))
    (hyp,) = tmp_path.glob("in.en.beam2.lenpen0.6.norepeat2.prefix*.a.hyp")
    assert all(line.startswith("ein hund") for line in hyp.read_text().splitlines())
    (tmp_path / "prefixes.de").write_text("zwei\nein mann\n")
    evaluate(files_mode(tmp_path, lines, checkpoint=str(path), search="greedy",
                        prefix_file=str(tmp_path / "prefixes.de")))
    (hyp,) = tmp_path.glob("in.en.greedy.prefix*.a.hyp")
    first, second = hyp.read_text().splitlines()
    assert first.startswith("zwei") and second.startswith("ein mann")
    (tmp_path / "prefixes.de").write_text("zwei\n")
    with pytest.raises(ConfigError, match="prefix_file=.* has 1 lines, src_file 2"):
        evaluate(files_mode(tmp_path, lines, checkpoint=str(path),
                            prefix_file=str(tmp_path / "prefixes.de")))


def test_interactive_nbest_prints_json_lines(tmp_path):
    path = make_checkpoint(tmp_path / "a.pt")
    out = io.StringIO()
    evaluate(eval_config(checkpoint=str(path), mode="interactive", nbest=2),
             stdin=io.StringIO("a dog runs.\ntwo children play.\n"), stdout=out)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r["id"], r["rank"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.mark.parametrize("overrides,message", [
    ({"search": "sample", "top_p": 0.0}, "top_p=0.0 must be in"),
    ({"search": "sample", "temperature": -1.0}, "temperature=-1.0 must be > 0"),
    ({"search": "sample", "top_k": -1}, "top_k=-1 must be >= 0"),
    ({"nbest": 3}, "nbest=3 must be at most beam=2"),
    ({"nbest": 2, "search": "sample"}, "nbest=2 needs search=beam"),
    ({"search": "topk"}, "search='topk' is not one of"),
    ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size=-1 must be >= 0"),
    ({"prefix_file": "p.txt"}, "prefix_file needs mode=files"),
    ({"prefix_file": "p.txt", "prefix": "x", "mode": "files"}, "prefix and prefix_file"),
])
def test_bad_search_options_name_their_key_before_loading(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        evaluate(eval_config(checkpoint="does-not-exist.pt", **overrides))
