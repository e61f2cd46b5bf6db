"""The command line of train.py and evaluate.py (transformer/cli.py): every user error is one
line ``error: ...`` naming the key, exit 2; --help; relative data paths.

Most cases run the entry point in this process (``runpy``, as ``python train.py`` would),
which costs no interpreter start-up; a few run real processes, to see what a shell sees."""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from transformer.checkpoint import read_checkpoint
from transformer.cli import absolute_data_paths, dotted_keys
from transformer.config import EvalConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]
QUIET = ["hydra/job_logging=none", "hydra/hydra_logging=none"]  # leave pytest's logging be


def run_in_process(script: str, args: list[str], cwd: Path, monkeypatch, capsys
                   ) -> tuple[int, str, str]:
    """``python <script> args`` started in ``cwd``: (exit status, stdout, stderr)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [str(REPO / script), *args])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # the entry point sets it: restored after
    monkeypatch.delenv("HYDRA_FULL_ERROR")
    if "MULTI30K_DIR" in os.environ:  # ... and may make it absolute
        monkeypatch.setenv("MULTI30K_DIR", os.environ["MULTI30K_DIR"])
    try:
        runpy.run_path(str(REPO / script), run_name="__main__")
        status = 0
    except SystemExit as exit:
        status = exit.code if isinstance(exit.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err


MISSPELT = "error: trainer.max_step is not a config key; did you mean trainer.max_steps?"


@pytest.mark.parametrize("script,args,expected", [
    # a key the schema lacks: Hydra stores a +key and nothing reads it
    ("train.py", ["+trainer.max_step=10"], MISSPELT),
    ("train.py", ["trainer.max_step=10"], MISSPELT),
    ("train.py", ["+trainer.lr=1e-3"],
     "error: trainer.lr is not a config key; did you mean optim.lr?"),
    ("train.py", ["-m", "+trainer.max_step=1,2"], MISSPELT),
    ("evaluate.py", ["checkpoint=x.pt", "+beams=4"],
     "error: beams is not a config key; did you mean beam?"),
    ("evaluate.py", ["checkpoint=x.pt", "model=tiny"],  # a group of train.py only
     "error: model is not a config key; did you mean mode?"),
    # search options that cannot work, refused before the checkpoint is read
    ("evaluate.py", ["checkpoint=x.pt", "search=sample", "top_p=1.5"],
     "error: top_p=1.5 must be in (0, 1] (1: no nucleus filter)"),
    ("evaluate.py", ["checkpoint=x.pt", "nbest=6"], "error: nbest=6 must be at most beam=5"),
    # a wrong type, an unknown group option, an override that does not parse
    ("train.py", ["model.d_model=abc"],
     "error: model.d_model: Value 'abc' of type 'str' could not be converted to Integer"),
    ("train.py", ["model=nope"],
     re.compile(r"error: model=nope: no such option in configs/model/; choose one of "
                r"(\w+, )*small(, \w+)*")),
    ("train.py", ["trainer.max_steps=[1"],
     "error: cannot parse the override 'trainer.max_steps=[1': no viable alternative at "
     "input '[1'"),
    # a missing mandatory value, a broken interpolation
    ("evaluate.py", [], "error: checkpoint has no value: add checkpoint=... to the command "
                        "line"),
    ("train.py", ["data.root=${oc.env:TRANSFORMER_TEST_UNSET}"],
     re.compile(r'error: data\.root: .*TRANSFORMER_TEST_UNSET.* not found"?')),
])
def test_a_user_error_is_one_line_and_exit_2(script, args, expected, tmp_path, monkeypatch,
                                             capsys):
    run_dir = tmp_path / "run"
    status, out, err = run_in_process(
        script, [*args, *QUIET, f"hydra.run.dir={run_dir}", f"hydra.sweep.dir={run_dir}"],
        tmp_path, monkeypatch, capsys)
    assert status == 2, (out, err)
    assert err.endswith("\n") and err.count("\n") == 1, err
    line = err.rstrip("\n")
    assert (expected.fullmatch(line) if isinstance(expected, re.Pattern)
            else line == expected), line
    assert "Traceback" not in out and not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize("where", ["file", "/proc"])
def test_a_run_directory_that_cannot_be_made_is_one_line(where, tmp_path, monkeypatch, capsys):
    # as root, a chmod-ed folder can still be written: a file in the way, or /proc
    if where == "file":
        (tmp_path / "taken").write_text("")
        run_dir = tmp_path / "taken" / "run"
    else:
        run_dir = Path("/proc/transformer-test/run")
    status, out, err = run_in_process("train.py", [*QUIET, f"hydra.run.dir={run_dir}"],
                                      tmp_path, monkeypatch, capsys)
    assert status == 2, (out, err)
    # the message names the folder that could not be made: the run directory or a parent
    assert err.count("\n") == 1 and err.startswith(f"error: {run_dir.parent}"), err
    assert "hydra.run.dir" in err


def test_hydra_full_error_set_by_the_user_keeps_the_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(REPO / "train.py"), "model.d_model=abc", *QUIET])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(Exception, match="Error merging override model.d_model=abc"):
        runpy.run_path(str(REPO / "train.py"), run_name="__main__")


def test_cfg_job_still_prints_the_config(tmp_path, monkeypatch, capsys):
    status, out, err = run_in_process("train.py", ["--cfg", "job", "model=tiny", *QUIET],
                                      tmp_path, monkeypatch, capsys)
    assert status == 0 and err == ""
    assert OmegaConf.create(out).model.d_model == 32


def help_text(script: str, tmp_path, monkeypatch, capsys) -> str:
    status, out, err = run_in_process(script, ["--help"], tmp_path, monkeypatch, capsys)
    assert status == 0 and err == "", err
    return out


def test_evaluate_help_describes_each_of_its_keys_and_no_train_group(tmp_path, monkeypatch,
                                                                     capsys):
    text = help_text("evaluate.py", tmp_path, monkeypatch, capsys)
    keys_section = text.split("== Values")[0]
    for field in fields(EvalConfig):  # a key added to EvalConfig needs its line in the help
        assert re.search(rf"(^  |, ){field.name}=\S*\s+\S", keys_section, re.MULTILINE), (
            f"{field.name} is not described in configs/hydra/help/evaluate.yaml")
    assert "Configuration groups" not in text and "experiment" not in text
    assert "checkpoint: ???" in text  # the values, with the overrides given


def test_train_help_explains_groups_and_keys_beside_hydras_listing(tmp_path, monkeypatch,
                                                                   capsys):
    text = help_text("train.py", tmp_path, monkeypatch, capsys)
    explained, listing = text.split("== Configuration groups ==")
    for group in ("model", "data", "experiment", "debug"):
        assert re.search(rf"^  {group}=\w+ +\S", explained, re.MULTILINE), group
        assert re.search(rf"^{group}: \w+", listing, re.MULTILINE), group  # Hydra's own
    known = dotted_keys(OmegaConf.structured(TrainConfig))
    named = set(re.findall(r"^  ((?:trainer|optim|data|model)\.\w+)=", explained,
                           re.MULTILINE))
    assert {"trainer.max_steps", "trainer.precision", "trainer.resume", "optim.lr"} <= named
    assert named <= set(known), named - set(known)


def test_absolute_data_paths_resolve_against_the_start_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MULTI30K_DIR", "../shared/data/multi30k")
    cfg = OmegaConf.structured(EvalConfig(checkpoint="run.pt", data_root="corpus"))
    absolute_data_paths(cfg, str(tmp_path / "start"))
    assert os.environ["MULTI30K_DIR"] == str(tmp_path / "shared/data/multi30k")
    assert cfg.data_root == str(tmp_path / "start/corpus")
    absolute_data_paths(cfg, "/elsewhere")  # absolute paths stay as they are
    assert cfg.data_root == str(tmp_path / "start/corpus")


# ----------------------------------------------------------------------------- real processes

def test_train_py_in_a_shell_one_line_exit_2_and_nothing_written(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "trainer.max_step=10"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr == MISSPELT + "\n" and result.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no outputs/ folder


def test_a_data_error_is_printed_once_and_kept_in_the_run_log(tmp_path):
    run_dir, missing = tmp_path / "run", tmp_path / "no-corpus"
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "debug=fast", "data=parallel_files",
         f"data.root={missing}", f"data.cache_dir={tmp_path / 'cache'}",
         f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    message = f"data.root={missing} is not a directory"
    assert result.returncode == 2, result.stderr[-3000:]
    assert (result.stdout + result.stderr).count(message) == 1, result.stdout + result.stderr
    assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1
    assert (run_dir / "train.log").read_text().count(message) == 1


def test_a_relative_data_root_is_recorded_absolute(write_corpus, toy_pairs, tmp_path):
    # evaluate.py reads the corpus from the checkpoint's data.root, from any folder later
    corpus = write_corpus({"train": toy_pairs(100, seed=1), "valid": toy_pairs(10, seed=2)})
    start = corpus.parent
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "debug=fast", "data=parallel_files",
         f"data.root={corpus.name}", "data.valid_split=valid", "data.test_splits=[]",
         "data.vocab_size=200", f"data.cache_dir={tmp_path / 'cache'}",
         "trainer.max_steps=0", "trainer.val_max_sentences=2", "logger.tensorboard=false",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=start, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    state = read_checkpoint(tmp_path / "run" / "checkpoints" / "checkpoint_last.pt")
    assert state["config"]["data"]["root"] == str(corpus)


def test_multi30k_dir_reaches_subprocesses_started_elsewhere(multi30k_dir, tmp_path):
    # what test_train.py, test_faults.py, ... do: a command in a temporary folder
    assert multi30k_dir.is_absolute()
    check = "import os, pathlib; assert (pathlib.Path(os.environ['MULTI30K_DIR']) / " \
            "'train.en.gz').exists(), os.environ['MULTI30K_DIR']"
    result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True,
                            text=True, env={**os.environ, "MULTI30K_DIR": str(multi30k_dir)})
    assert result.returncode == 0, result.stderr
    if "MULTI30K_DIR" in os.environ:  # the environment as LiveRun (test_faults.py) hands it on
        result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_the_suite_takes_a_relative_multi30k_dir(multi30k_dir, tmp_path):
    # The README's set-up exports MULTI30K_DIR=../shared/data/multi30k, relative; here
    # pytest starts in yet another folder (one pytest process costs ~8 s of CPU: only one).
    cwd = tmp_path
    env = {**os.environ, "MULTI30K_DIR": os.path.relpath(multi30k_dir, cwd)}
    test = f"{REPO / 'tests' / 'test_cli.py'}::test_multi30k_dir_reaches_subprocesses_" \
           "started_elsewhere"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             test], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "1 passed" in result.stdout
