"""End-to-end tests of train.py on tiny configs and the real Multi30k files (CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2 as hp_api
from tensorboard.plugins.hparams import backend_context as hp_backend
from tensorboard.plugins.hparams import metadata as hp_metadata

from transformer.checkpoint import read_checkpoint
from transformer.config import register_configs
from transformer.trainer import bleu_statistics, train

REPO = Path(__file__).resolve().parents[1]
TRAIN_TAGS = {"train/loss", "train/nll_loss", "train/ppl", "train/lr", "train/grad_norm",
              "train/tokens_per_s"}
VAL_TAGS = {"val/loss", "val/ppl", "val/bleu"}


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_cache")


def run_train(args: list[str], multi30k_dir: Path, cache: Path, cwd: Path
              ) -> subprocess.CompletedProcess:
    env = {**os.environ, "MULTI30K_DIR": str(multi30k_dir)}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args,
                           f"data.cache_dir={cache}"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def events(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    accumulator.Reload()
    return accumulator


def scalar_values(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events(run_dir).Scalars(tag)]


def compose_config(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_debug_fast_end_to_end(multi30k_dir, data_cache, tmp_path):
    run_dir = tmp_path / "run"
    result = run_train(["debug=fast", f"hydra.run.dir={run_dir}"], multi30k_dir, data_cache,
                       tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    accumulator = events(run_dir)
    tags = set(accumulator.Tags()["scalars"])
    assert tags >= TRAIN_TAGS | VAL_TAGS, tags
    assert accumulator.Tags()["images"], "attention heat maps"
    assert any("example" in tag for tag in accumulator.Tags()["tensors"]), "text examples"
    checkpoint = read_checkpoint(run_dir / "checkpoints" / "checkpoint_last.pt")
    assert checkpoint["step"] == 30
    assert (run_dir / "checkpoints" / "checkpoint_best.pt").exists()
    assert (run_dir / ".hydra" / "config.yaml").exists()


def test_sweep_runs_two_jobs_with_hparams(multi30k_dir, data_cache, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_train(["-m", "debug=fast", "optim.lr=1e-3,5e-4", "trainer.max_steps=10",
                        "trainer.val_every_steps=10", f"hydra.sweep.dir={sweep_dir}"],
                       multi30k_dir, data_cache, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {}
    for job in ("0", "1"):
        accumulator = events(sweep_dir / job)
        assert "val/bleu" in accumulator.Tags()["scalars"]
        runs[job] = accumulator.PluginTagToContent("hparams")
        assert list(runs[job]) == [hp_metadata.SESSION_START_INFO_TAG], runs[job]
    trials = {hp_metadata.parse_session_start_info_plugin_data(
        runs[job][hp_metadata.SESSION_START_INFO_TAG]).group_name for job in runs}
    assert trials == {f"debug=fast,optim.lr={lr},trainer.max_steps=10,trainer.val_every_steps=10"
                      for lr in ("0.001", "0.0005")}, trials  # no data.cache_dir: a place
    # TensorBoard's own table for these runs: the swept key is the first column.
    context = hp_backend.Context.__new__(hp_backend.Context)
    experiment = hp_api.Experiment(hparam_infos=context._compute_hparam_infos(runs))
    hp_backend._sort_and_reduce_to_hparams_limit(experiment, None)
    assert experiment.hparam_infos[0].name == "optim.lr"
    lrs = {read_checkpoint(sweep_dir / job / "checkpoints" / "checkpoint_last.pt")
           ["config"]["optim"]["lr"] for job in ("0", "1")}
    assert lrs == {1e-3, 5e-4}


def test_overfitting_one_batch(multi30k_dir, data_cache, tmp_path):
    cfg = compose_config(["debug=overfit", f"data.root={multi30k_dir}",
                          f"data.cache_dir={data_cache}", "logger.tensorboard=true"])
    train(cfg, tmp_path)
    losses = scalar_values(tmp_path, "train/nll_loss")
    assert losses[0][1] > 3.0 and losses[-1][1] < 0.1, losses


def resume_config(multi30k_dir, cache, max_steps, resume="never"):
    return compose_config([
        "debug=fast", f"data.root={multi30k_dir}", f"data.cache_dir={cache}",
        f"trainer.max_steps={max_steps}", "trainer.val_every_steps=8",
        "trainer.save_every_steps=4", "trainer.log_every_steps=2", "model.dropout=0.1",
        f"trainer.resume={resume}", "logger.attention_maps=false"])


def test_resume_gives_exactly_the_uninterrupted_run(multi30k_dir, data_cache, tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(resume_config(multi30k_dir, data_cache, 20), straight)
    train(resume_config(multi30k_dir, data_cache, 10), interrupted)
    train(resume_config(multi30k_dir, data_cache, 20, resume="auto"), interrupted)
    expected = read_checkpoint(straight / "checkpoints" / "checkpoint_last.pt")
    resumed = read_checkpoint(interrupted / "checkpoints" / "checkpoint_last.pt")
    assert resumed["step"] == expected["step"] == 20
    for name, tensor in expected["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert scalar_values(interrupted, "train/loss") == scalar_values(straight, "train/loss")


def test_fp16_with_grad_scaler_runs(multi30k_dir, data_cache, tmp_path):
    cfg = compose_config(["debug=fast", f"data.root={multi30k_dir}",
                          f"data.cache_dir={data_cache}", "trainer.precision=fp16",
                          "trainer.max_steps=6", "trainer.val_every_steps=6",
                          "trainer.log_every_steps=2"])
    train(cfg, tmp_path)
    assert [v for _, v in scalar_values(tmp_path, "train/loss_scale")]
    checkpoint = read_checkpoint(tmp_path / "checkpoints" / "checkpoint_last.pt")
    assert checkpoint["scaler"]["scale"] > 0


@pytest.mark.parametrize("override,key", [
    ("model.d_model=abc", "model.d_model"),
    ("trainer.nope=1", "nope"),
    ("model.n_heads=7", "model.n_heads"),
    ("trainer.precision=fp8", "trainer.precision"),
])
def test_invalid_override_fails_before_training(override, key, multi30k_dir, data_cache,
                                                tmp_path):
    run_dir = tmp_path / "run"
    result = run_train(["model=base", override, f"hydra.run.dir={run_dir}"], multi30k_dir,
                       data_cache, tmp_path)
    assert result.returncode != 0
    assert key in result.stderr + result.stdout
    assert not list(run_dir.rglob("*.pt"))


def test_optuna_search_runs_trials(multi30k_dir, data_cache, tmp_path):
    sweep_dir = tmp_path / "optuna"
    result = run_train(["hparams_search=lr_warmup", "debug=fast", "hydra.sweeper.n_trials=2",
                        "trainer.max_steps=4", "trainer.val_every_steps=4",
                        "trainer.val_max_sentences=4", f"hydra.sweep.dir={sweep_dir}"],
                       multi30k_dir, data_cache, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (sweep_dir / "optimization_results.yaml").exists()
    assert (sweep_dir / "1" / "checkpoints" / "checkpoint_last.pt").exists()


def test_every_config_composes():
    """Each option of each group composes against the typed schema and validates."""
    from transformer.components import PARTS
    from transformer.config import validate

    for group in ("model", "data", "optim", "sched", "experiment", "debug",
                  *(f"model/{part}" for part in PARTS)):
        for option in sorted((REPO / "configs" / group).glob("*.yaml")):
            cfg = compose_config([f"{group}={option.stem}"])
            validate(cfg)


@pytest.mark.parametrize("launcher", ["slurm", "slurm_local"])
def test_slurm_launcher_configs_compose_against_the_plugin(launcher):
    """The plugin's structured config refuses keys it does not know (srun_args in 1.2):
    each SLURM launcher config merges into it (tests/test_slurm.py runs them)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert cfg.hydra.launcher.tasks_per_node == (8 if launcher == "slurm" else 1)


def test_early_stopping_after_patience_validations(multi30k_dir, data_cache, tmp_path,
                                                   monkeypatch):
    from transformer.training import validation

    # A validation that never improves: the first sets the best, the next `patience` don't.
    monkeypatch.setattr(validation, "validate", lambda run: {"val/bleu": 5.0})
    cfg = compose_config(["debug=fast", f"data.root={multi30k_dir}",
                          f"data.cache_dir={data_cache}", "trainer.max_steps=40",
                          "trainer.val_every_steps=2", "trainer.patience=2"])
    best = train(cfg, tmp_path)
    assert best == 5.0
    assert read_checkpoint(tmp_path / "checkpoints" / "checkpoint_last.pt")["step"] == 6


def test_validation_bleu_is_lowercased_for_a_lowercasing_tokenizer():
    # Hand-counted: only "A"/"a" differs, so 3 of 4 unigrams match cased and 4 of 4 lowercased.
    cased = bleu_statistics(["A dog runs ."], ["a dog runs ."])
    lowercased = bleu_statistics(["A dog runs ."], ["a dog runs ."], lowercase=True)
    assert cased[0] == 3 and lowercased[0] == 4 and cased[4] == lowercased[4] == 4
