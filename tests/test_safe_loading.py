"""Checkpoints load without pickle: every path that reads one refuses a file whose pickle
would run code (and runs none of it), format-1 files load through a logged allow-list, and
an exported folder (safetensors + JSON) translates exactly as its checkpoint."""

from __future__ import annotations

import json
import logging
import os
import random
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

import transformer.export as export_module
from tests.conftest import make_toy_pairs
from tests.test_evaluate import TINY, eval_config
from tests.test_train import compose_config
from transformer.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    average_checkpoints,
    last_checkpoints,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from transformer.config import DataConfig, TrainConfig
from transformer.evaluation import evaluate
from transformer.export import read_export, write_export
from transformer.model import build_model
from transformer.tokenizer import Tokenizer
from transformer.trainer import rng_state, set_rng_state, train
from transformer.translation import translate

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import average_checkpoints as average_script  # noqa: E402
import export as export_script  # noqa: E402

SENTENCES = make_toy_pairs(12, seed=9)[0] + ["", "two red dogs run on the grass."]


class RunsCode:
    """What an attacker puts in a checkpoint: unpickling it calls ``os.system``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def run_overrides(corpus: Path, cache: Path, *extra: str) -> list[str]:
    return ["debug=fast", "data=parallel_files", f"data.root={corpus}",
            f"data.cache_dir={cache}", "trainer.max_steps=8", "trainer.save_every_steps=4",
            "trainer.val_every_steps=1000", "trainer.log_every_steps=4",
            "model.dropout=0.1", "logger.tensorboard=false", *extra]  # dropout: RNG matters


@pytest.fixture(scope="module")
def trained(corpus, cache, tmp_path_factory) -> Path:
    """A run directory of 8 steps (checkpoints at 4 and 8), in fp16 so that the GradScaler
    state is not empty: every kind of entry a real checkpoint has."""
    run_dir = tmp_path_factory.mktemp("trained")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(compose_config(run_overrides(corpus, cache, "trainer.precision=fp16")), run_dir)
    finally:
        torch.set_num_threads(threads)
    return run_dir


@pytest.fixture
def evil(trained, tmp_path) -> tuple[Path, Path]:
    """``(checkpoint, marker)``: the trained checkpoint with a payload that creates
    ``marker`` when unpickled; shown here to do so under ``weights_only=False``."""
    marker = tmp_path / "MARKER"
    state = torch.load(trained / "checkpoints" / "checkpoint_last.pt", weights_only=True)
    path = tmp_path / "evil.pt"
    torch.save({**state, "meter": RunsCode(marker)}, path)
    torch.load(path, weights_only=False)  # what the loader did before
    assert marker.exists()
    marker.unlink()
    return path, marker


def run_script(script, args: list, monkeypatch) -> int:
    """A script's ``main()`` in this process (a subprocess costs seconds of imports)."""
    monkeypatch.setattr(sys, "argv", [script.__file__, *map(str, args)])
    return script.main()


def assert_refused(error: Exception | str, path: Path) -> None:
    message = str(error)
    assert f"{path} is refused: its pickle needs posix.system" in message, message
    assert "\n" not in message


# ----------------------------------------------------------------------------- refusals

def test_evaluate_py_refuses_it_with_one_line(evil, tmp_path):
    path, marker = evil
    (tmp_path / "in.en").write_text("a dog runs.\n")
    result = subprocess.run([sys.executable, str(REPO / "evaluate.py"), f"checkpoint={path}",
                             "mode=files", f"src_file={tmp_path / 'in.en'}"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert_refused(errors[0], path)
    assert not marker.exists()


def test_average_script_refuses_it(evil, trained, tmp_path, monkeypatch, capsys):
    path, marker = evil
    good = trained / "checkpoints" / "checkpoint_4.pt"
    assert run_script(average_script, ["--inputs", good, path, "--output", tmp_path / "avg.pt"],
                      monkeypatch) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1
    assert_refused(error.strip(), path)
    assert not marker.exists() and not (tmp_path / "avg.pt").exists()


def test_evaluate_average_last_and_ensemble_refuse_it(evil, trained, tmp_path):
    path, marker = evil
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(path, run / "checkpoints" / "checkpoint_4.pt")  # the older one: read second
    shutil.copy(trained / "checkpoints" / "checkpoint_8.pt", run / "checkpoints")
    with pytest.raises(UnsafeCheckpointError) as error:
        evaluate(eval_config(checkpoint=str(run), average_last=2, mode="interactive"))
    assert_refused(error.value, run / "checkpoints" / "checkpoint_4.pt")
    good = trained / "checkpoints" / "checkpoint_8.pt"
    with pytest.raises(UnsafeCheckpointError) as error:
        evaluate(eval_config(checkpoint=str(good), ensemble=[str(path)], mode="interactive"))
    assert_refused(error.value, path)
    assert not marker.exists()


@pytest.mark.parametrize("how", ["resume_file", "resume_auto", "init_from"])
def test_training_refuses_it(how, evil, trained, corpus, cache, tmp_path):
    path, marker = evil
    run_dir = tmp_path / "run"
    if how == "resume_auto":  # newest in the run directory, an older good one beside it:
        checkpoints = run_dir / "checkpoints"  # no silent fall-back to the good one
        checkpoints.mkdir(parents=True)
        shutil.copy(trained / "checkpoints" / "checkpoint_4.pt", checkpoints)
        shutil.copy(path, checkpoints / "checkpoint_8.pt")
        os.link(checkpoints / "checkpoint_8.pt", checkpoints / "checkpoint_last.pt")
        path = checkpoints / "checkpoint_last.pt"
    override = {"resume_file": f"trainer.resume={path}", "resume_auto": "trainer.resume=auto",
                "init_from": f"trainer.init_from={path}"}[how]
    with pytest.raises(UnsafeCheckpointError) as error:
        train(compose_config(run_overrides(corpus, cache, override)), run_dir)
    assert_refused(error.value, path)
    assert not marker.exists()


def test_only_numpys_rng_types_are_allowed_for_legacy_files(trained, tmp_path):
    state = torch.load(trained / "checkpoints" / "checkpoint_last.pt", weights_only=True)
    mixed = tmp_path / "mixed.pt"  # a legacy RNG state does not let a payload through
    marker = tmp_path / "MARKER"
    torch.save({**state, "rng": np.random.get_state(), "meter": RunsCode(marker)}, mixed)
    with pytest.raises(UnsafeCheckpointError, match="needs posix.system"):
        read_checkpoint(mixed)
    floats = tmp_path / "floats.pt"  # an ndarray, but not of the RNG's dtype
    torch.save({**state, "meter": np.zeros(3)}, floats)
    with pytest.raises(UnsafeCheckpointError, match=r"floats.pt is refused: .*Float64DType"):
        read_checkpoint(floats)
    old_zip = tmp_path / "old_serialization.pt"  # torch.save's format before torch 1.6
    torch.save({**state, "meter": RunsCode(marker)}, old_zip,
               _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match="needs posix.system"):
        read_checkpoint(old_zip)
    assert not marker.exists()
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="junk.pt is truncated or corrupt") as error:
        read_checkpoint(tmp_path / "junk.pt")
    assert not isinstance(error.value, UnsafeCheckpointError)  # resume=auto may skip it


# ----------------------------------------------------------------------------- current, legacy

def test_a_training_checkpoint_is_tensors_and_plain_data(trained):
    state = torch.load(trained / "checkpoints" / "checkpoint_last.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0 and state["optimizer"]["state"]
    assert isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)


def test_rng_state_survives_weights_only_saving(tmp_path):
    np.random.normal()  # leaves a cached Gaussian in numpy's state
    saved = rng_state()
    expected = (random.random(), np.random.normal(), np.random.randint(1 << 30, size=3).tolist(),
                torch.rand(3))
    torch.save(saved, tmp_path / "rng.pt")
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.normal(), np.random.randint(1 << 30, size=3).tolist(),
           torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def as_legacy(state: dict) -> dict:
    """``state`` as format-1 code wrote it: numpy's RNG state as np.random.get_state()'s
    tuple, with its uint32 key array."""
    def legacy_rng(rng: dict) -> dict:
        numpy_state = rng["numpy"]
        return {**rng, "numpy": (numpy_state["bit_generator"],
                                 numpy_state["keys"].numpy().astype(np.uint32),
                                 numpy_state["pos"], numpy_state["has_gauss"],
                                 numpy_state["cached_gaussian"])}
    return {**state, "format_version": 1, "rng": legacy_rng(state["rng"]),
            "rng_per_rank": [legacy_rng(rng) for rng in state["rng_per_rank"]]}


def test_a_legacy_checkpoint_loads_logs_and_resumes_the_same(trained, corpus, cache, tmp_path,
                                                             caplog):
    state = torch.load(trained / "checkpoints" / "checkpoint_4.pt", weights_only=True)
    legacy = tmp_path / "legacy" / "checkpoints" / "checkpoint_4.pt"
    legacy.parent.mkdir(parents=True)
    torch.save(as_legacy(state), legacy)
    assert sorted(torch.serialization.get_unsafe_globals_in_checkpoint(legacy)) == [
        "numpy._core.multiarray._reconstruct", "numpy.dtype", "numpy.ndarray"]  # as main wrote
    with caplog.at_level(logging.WARNING, logger="transformer.checkpoint"):
        loaded = read_checkpoint(legacy)
    assert len(caplog.records) == 1
    assert f"{legacy} is in the legacy format" in caplog.text and "numpy.ndarray" in caplog.text
    assert isinstance(loaded["rng"]["numpy"], tuple)
    draws = []
    for rng in (loaded["rng"], state["rng"]):
        set_rng_state(rng)
        draws.append((random.random(), np.random.random(4).tolist(), torch.rand(4).tolist()))
    assert draws[0] == draws[1]
    # Both resume to step 8 from step 4: the same weights, so the same RNG streams.
    for name, path in [("current", trained / "checkpoints" / "checkpoint_4.pt"),
                       ("legacy", legacy)]:
        run_dir = tmp_path / name
        train(compose_config(run_overrides(corpus, cache, "trainer.precision=fp16",
                                           f"trainer.resume={path}")), run_dir)
    resumed = [read_checkpoint(tmp_path / name / "checkpoints" / "checkpoint_8.pt")["model"]
               for name in ("current", "legacy")]
    assert all(torch.equal(resumed[0][k], resumed[1][k]) for k in resumed[0])
    assert isinstance(read_checkpoint(tmp_path / "legacy" / "checkpoints" /
                                      "checkpoint_8.pt")["rng"]["numpy"], dict)  # re-saved


# ----------------------------------------------------------------------------- export

def outputs(model, tokenizer) -> list[list[str]]:
    return [translate(model, tokenizer, SENTENCES, beam=beam, max_len_b=8) for beam in (1, 4)]


def test_export_translates_exactly_as_the_checkpoint(trained, tmp_path, monkeypatch):
    checkpoint = trained / "checkpoints" / "checkpoint_last.pt"
    assert run_script(export_script, [checkpoint, tmp_path / "exported"], monkeypatch) == 0
    exported = tmp_path / "exported"
    assert sorted(p.name for p in exported.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json"]
    original, state = read_checkpoint(checkpoint), read_checkpoint(exported)
    assert state["tokenizer"] == original["tokenizer"]
    assert state["config"] == original["config"] and state["vocab_size"] == original["vocab_size"]
    with safe_open(str(exported / "model.safetensors"), framework="pt") as f:
        assert len(f.keys()) == len(original["model"]) - 1  # the tied output projection
    for name, tensor in original["model"].items():
        assert torch.equal(state["model"][name], tensor), name
    (model, tokenizer, _), (reference, _, _) = (load_checkpoint(exported),
                                                load_checkpoint(checkpoint))
    assert model.output_projection.weight is model.decoder.embedding.tokens.weight
    assert outputs(model, tokenizer) == outputs(reference, tokenizer)
    (tmp_path / "in.en").write_text("".join(f"{line}\n" for line in SENTENCES))
    hypotheses = []
    for source in (exported, checkpoint):
        out = tmp_path / f"out_{source.name}"
        evaluate(eval_config(checkpoint=str(source), mode="files", beam=4, max_len_b=8,
                             src_file=str(tmp_path / "in.en"), output_dir=str(out)))
        (hyp,) = out.glob("in.en.*.hyp")  # the settings are in the name
        hypotheses.append(hyp.read_text())
    assert hypotheses[0] == hypotheses[1] and len(hypotheses[0].splitlines()) == len(SENTENCES)


def test_export_of_an_average(trained, tmp_path, monkeypatch, capsys):
    assert run_script(export_script, [trained, tmp_path / "avg", "--average-last", "2"],
                      monkeypatch) == 0
    expected = average_checkpoints(last_checkpoints(trained, 2))["model"]
    got = read_checkpoint(tmp_path / "avg")["model"]
    assert all(torch.equal(got[name], tensor) for name, tensor in expected.items())
    capsys.readouterr()
    assert run_script(export_script, [trained / "checkpoints" / "nope.pt", tmp_path / "x"],
                      monkeypatch) == 2
    assert capsys.readouterr().err.startswith("error: checkpoint not found")
    assert not (tmp_path / "x").exists()


def test_fine_tuning_starts_from_an_export(trained, corpus, cache, tmp_path):
    original = read_checkpoint(trained)
    exported = write_export(original, tmp_path / "exported")
    train(compose_config(run_overrides(corpus, cache, f"trainer.init_from={exported}")),
          tmp_path / "run")
    first = read_checkpoint(tmp_path / "run" / "checkpoints" / "checkpoint_4.pt")  # from step 0
    assert first["tokenizer"] == original["tokenizer"]
    assert first["config"]["model"] == original["config"]["model"]


def separate_vocabularies(tmp_path: Path) -> Path:
    """A checkpoint whose two sides have their own tokenizers, of different sizes."""
    torch.manual_seed(0)
    src, tgt = make_toy_pairs(60)
    src_tokenizer, tgt_tokenizer = (Tokenizer.train(src, vocab_size=290),
                                    Tokenizer.train(tgt, vocab_size=300))
    model = build_model(TINY, src_tokenizer.vocab_size, tgt_tokenizer.vocab_size)
    config = TrainConfig(model=TINY, data=DataConfig())
    path = tmp_path / "separate.pt"
    save_checkpoint({"model": model.state_dict(), "step": 3,
                     "config": OmegaConf.to_container(OmegaConf.structured(config)),
                     "tokenizer": {"src": src_tokenizer.to_str(), "tgt": tgt_tokenizer.to_str()},
                     "vocab_size": {"src": src_tokenizer.vocab_size,
                                    "tgt": tgt_tokenizer.vocab_size}}, path)
    return path


def test_export_with_separate_vocabularies(tmp_path):
    checkpoint = separate_vocabularies(tmp_path)
    original = read_checkpoint(checkpoint)
    assert original["vocab_size"]["src"] != original["vocab_size"]["tgt"]
    exported = write_export(original, tmp_path / "exported")
    assert {"tokenizer_src.json", "tokenizer_tgt.json"} <= {p.name for p in exported.iterdir()}
    assert not (exported / "tokenizer.json").exists()
    assert read_export(exported)["tokenizer"] == original["tokenizer"]
    (model, tokenizer, _), (reference, _, _) = (load_checkpoint(exported),
                                                load_checkpoint(checkpoint))
    assert outputs(model, tokenizer) == outputs(reference, tokenizer)


def test_a_failed_export_leaves_no_folder(trained, tmp_path, monkeypatch):
    state = read_checkpoint(trained)

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "write_tokenizers", disk_full)
    with pytest.raises(CheckpointError, match="could not write .*out: No space left"):
        write_export(state, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary twin
    monkeypatch.undo()
    (tmp_path / "out").mkdir()  # an empty folder may be the target; a full one may not
    write_export(state, tmp_path / "out")
    with pytest.raises(CheckpointError, match="out exists and is not an empty folder"):
        write_export(state, tmp_path / "out")


def one_line_error(path: Path, match: str) -> None:
    with pytest.raises(CheckpointError, match=match) as error:
        load_checkpoint(path)
    assert "\n" not in str(error.value)


def test_a_bad_export_names_the_file(trained, tmp_path):
    good = write_export(read_checkpoint(trained), tmp_path / "good")
    weights = good / "model.safetensors"

    def variant(name: str) -> Path:
        return Path(shutil.copytree(good, tmp_path / name))

    truncated = variant("truncated") / "model.safetensors"
    truncated.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    one_line_error(truncated.parent, f"{truncated} is truncated or corrupt")
    garbage = variant("garbage") / "model.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    one_line_error(garbage.parent, f"{garbage} is truncated or corrupt")
    for name, change in [("wider", lambda meta: meta["config"]["model"].update(d_ff=128)),
                         ("vocab", lambda meta: meta["vocab_size"].update(tgt=999))]:
        config = variant(name) / "config.json"
        meta = json.loads(config.read_text())
        change(meta)
        config.write_text(json.dumps(meta))
        one_line_error(config.parent, f"{config} does not match the weights in "
                                      "model.safetensors: .*size mismatch")
    config = variant("not_json") / "config.json"
    config.write_text("{")
    one_line_error(config.parent, f"{config} is not readable JSON")
    config = variant("marian") / "config.json"
    config.write_text('{"model_type": "marian", "vocab_size": 58101}')
    one_line_error(config.parent, f"{config} is not the config.json of a scripts/export.py")
    missing = variant("missing")
    (missing / "config.json").unlink()
    one_line_error(missing, f"{missing / 'config.json'} not found")


def test_export_of_a_converted_marian_model(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    from tests.test_marian import marian_directory, train_spm
    from transformer.marian import convert_marian

    directory = marian_directory(tmp_path / "opus-mt", train_spm(48, seed=0), shared=True)
    with pytest.raises(CheckpointError, match="a Hugging Face Marian model"):
        read_checkpoint(directory)  # its config.json is not an export's
    state = convert_marian(directory)
    exported = write_export(state, tmp_path / "exported")
    assert read_export(exported)["tokenizer"] == state["tokenizer"]
    (model, tokenizer, _), (reference, _, _) = load_checkpoint(exported), load_checkpoint(state)
    assert outputs(model, tokenizer) == outputs(reference, tokenizer)
