"""The Makefile: where `make train` and `make test` look for the Multi30k files, that a
second call skips the set-up, and that `make -C` runs the job from elsewhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from tests.conftest import make_toy_pairs

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def make(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``make ARGS`` with none of the variables the Makefile reads taken from this process's
    environment (`make test` itself sets MULTI30K_DIR for pytest)."""
    outer = {"MULTI30K_DIR", "VENV", "ARGS", "TORCH_SPEC", "TORCH_INDEX", "MAKEFLAGS", "MFLAGS",
             "MAKELEVEL"}
    env = {key: value for key, value in os.environ.items() if key not in outer}
    return subprocess.run(["make", "--no-print-directory", *args], cwd=cwd,
                          env={**env, "LC_ALL": "C"}, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the Makefile and pyproject.toml in ``tmp/repo``, beside which a test may put
    ``tmp/shared/data/multi30k``; called from ``tmp/else/where`` (not beside ``shared``)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(REPO / name, repo / name)
    (tmp_path / "else" / "where").mkdir(parents=True)
    return repo


def train_command(repo: Path, how: str, *args: str) -> str:
    """The last command `make -n -C repo train ARGS=...` (or `-f repo/Makefile`) prints from
    ``tmp/else/where``: the job itself."""
    where = ["-C", str(repo)] if how == "-C" else ["-f", str(repo / "Makefile")]
    result = make("-n", *where, "train", *args, cwd=repo.parent / "else" / "where")
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[-1].strip()


HOW = pytest.mark.parametrize("how", ["-C", "-f"])


@HOW
def test_data_default_is_the_shared_copy_beside_the_repository(project, how):
    shared = project.parent / "shared" / "data" / "multi30k"
    shared.mkdir(parents=True)
    assert train_command(project, how, "ARGS=debug=fast trainer.max_steps=3") == (
        f"cd {project} && MULTI30K_DIR={shared} {project}/.venv/bin/python train.py "
        "experiment=multi30k_en_de debug=fast trainer.max_steps=3")


@HOW
def test_a_relative_data_path_counts_from_the_repository(project, how):
    command = train_command(project, how, "MULTI30K_DIR=data/multi30k")
    assert f" MULTI30K_DIR={project / 'data/multi30k'} " in command, command


@HOW
def test_without_data_the_job_runs_without_a_path(project, how):
    command = train_command(project, how)
    assert "MULTI30K_DIR" not in command
    assert command.endswith("train.py experiment=multi30k_en_de"), command


def test_set_up_runs_once_and_again_when_pyproject_changes(project, tmp_path):
    venv = tmp_path / "venv"
    first = make("-n", "-C", str(project), "setup", f"VENV={venv}", cwd=tmp_path / "else" / "where")
    assert f"-m pip install -qq -e \"{project}[dev]\"" in first.stdout, first.stdout

    venv.mkdir()
    (venv / ".installed").touch()
    start = time.perf_counter()
    warm = make("-C", str(project), "setup", f"VENV={venv}", cwd=tmp_path / "else" / "where")
    seconds = time.perf_counter() - start
    assert warm.returncode == 0 and "Nothing to be done" in warm.stdout, warm.stdout
    assert seconds < 1, seconds

    future = time.time() + 60
    os.utime(project / "pyproject.toml", (future, future))
    changed = make("-n", "-C", str(project), "setup", f"VENV={venv}", cwd=tmp_path)
    assert "pip install" in changed.stdout, changed.stdout


def borrowed_venv(path: Path) -> Path:
    """A venv at ``path`` that sees this interpreter's installed packages (a .pth file) and
    carries the Makefile's stamp: a built environment in a second, without a download."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(path)}))
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (path / ".installed").touch()
    return path


@pytest.mark.slow
def test_make_train_runs_the_job_from_elsewhere(write_corpus, tmp_path):
    """`make -C repo train ARGS=...` with a built environment: no set-up, the data path
    (relative here) reaches the data code as an absolute one, and the overrides reach Hydra."""
    corpus = write_corpus({"train": make_toy_pairs(40), "val": make_toy_pairs(6, seed=1)},
                          gz=True)
    venv = borrowed_venv(tmp_path / "venv")
    run_dir = tmp_path / "run"
    args = ("debug=fast trainer.precision=fp32 trainer.max_steps=2 trainer.val_every_steps=2 "
            "trainer.save_every_steps=2 trainer.val_max_sentences=4 data.download=false "
            f"data.cache_dir={tmp_path / 'cache'} hydra.run.dir={run_dir}")
    result = make("-C", str(REPO), "train", f"VENV={venv}",
                  f"MULTI30K_DIR={os.path.relpath(corpus, REPO)}", f"ARGS={args}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "setting up" not in result.stdout
    log = (run_dir / "train.log").read_text()
    assert "train: 40 of 40 pairs kept" in log, log
    assert (run_dir / "checkpoints" / "checkpoint_last.pt").exists()
