"""docs/extending.md, performed from a folder outside the package: the page's own code
blocks become ``my_pkg/`` and ``my_configs/``, then train.py trains with the user's
attention class, resumes, and evaluate.py translates with beam search; a checkpoint that
names the class loads only where the user trusts its module and can import it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from transformer.checkpoint import CheckpointError, load_checkpoint, read_checkpoint

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "extending.md"
TARGET = "my_pkg.qk_norm.QKNormAttention"


def doc_files() -> dict[str, str]:
    """``{path: text}``: each python or yaml block of the page whose first line is a
    comment naming a file (``# my_pkg/qk_norm.py``)."""
    files = {}
    for block in re.findall(r"```(?:python|yaml)\n(.*?)```", DOC.read_text(), re.DOTALL):
        first = block.partition("\n")[0]
        if re.fullmatch(r"# [\w/]+\.(py|yaml)", first):
            files[first[2:]] = block
    return files


@pytest.fixture(scope="module")
def project(tmp_path_factory, write_corpus, toy_pairs) -> Path:
    folder = tmp_path_factory.mktemp("my_project")
    for name, text in doc_files().items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    corpus = write_corpus({"train": toy_pairs(200, seed=1), "valid": toy_pairs(20, seed=2),
                           "test": toy_pairs(12, seed=3)})
    (folder / "corpus").symlink_to(corpus)
    return folder


def run(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python <script> args`` as the page runs it: in the project, on its PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(cwd), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_page_has_the_class_its_config_and_a_package(project):
    assert set(doc_files()) == {"my_pkg/qk_norm.py", "my_pkg/__init__.py",
                                "my_configs/model/attention/qk_norm.yaml"}


def test_a_users_attention_trains_resumes_and_translates(project):
    train = ["hydra.searchpath=[file://my_configs]", "model/attention=qk_norm",
             "hydra.run.dir=runs/qk_norm", "debug=fast", "data=parallel_files",
             "data.root=corpus", "data.cache_dir=cache", "data.vocab_size=200",
             "trainer.val_every_steps=3", "trainer.save_every_steps=3",
             "trainer.val_max_sentences=4", "logger.tensorboard=false"]
    first = run("train.py", [*train, "trainer.max_steps=3"], project)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = project / "runs" / "qk_norm" / "checkpoints"
    state = read_checkpoint(checkpoints / "checkpoint_last.pt")
    assert state["config"]["model"]["attention"] == {"_target_": TARGET, "_partial_": True,
                                                     "scale": 10.0}
    assert any(name.endswith("self_attn.scale") for name in state["model"])

    resumed = run("train.py", [*train, "trainer.max_steps=6", "trainer.resume=auto"], project)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert "trust_modules=[my_pkg]" in resumed.stdout  # in the evaluate.py command it prints
    assert read_checkpoint(checkpoints / "checkpoint_last.pt")["step"] == 6

    evaluated = run("evaluate.py", [f"checkpoint={checkpoints / 'checkpoint_last.pt'}",
                                    "trust_modules=[my_pkg]", "splits=[test]", "beam=3",
                                    "max_len_b=5", "hydra/job_logging=none"], project)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "BLEU" in evaluated.stdout
    (hypotheses,) = (project / "runs" / "qk_norm" / "translations").glob("test.*beam3*.hyp")
    assert len(hypotheses.read_text().splitlines()) == 12

    refused = run("evaluate.py", [f"checkpoint={checkpoints / 'checkpoint_last.pt'}",
                                  "splits=[test]", "hydra/job_logging=none"], project)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and refused.stderr.startswith("error: ")
    assert f"model.attention._target_={TARGET}" in refused.stderr
    assert "trust_modules=[my_pkg]" in refused.stderr

    # Here, in pytest's process, my_pkg is not importable: trusting it is not enough.
    with pytest.raises(CheckpointError, match=rf"model.attention._target_={TARGET}: cannot "
                                              r"import my_pkg.qk_norm \(No module named"):
        load_checkpoint(checkpoints / "checkpoint_last.pt", trust_modules=["my_pkg"])
