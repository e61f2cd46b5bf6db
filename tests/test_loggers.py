"""W&B and MLflow beside TensorBoard: the scalars, text samples and hyperparameters that
TensorBoard gets, one tracker run continued on resume, checked in what each wrote (W&B
offline, MLflow in a file store); a missing package refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

if os.environ.get("CI") == "true":  # in the dev extra: CI runs these, never skips them
    import mlflow  # noqa: F401
    import wandb  # noqa: F401
else:
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")

from transformer.config import ConfigError  # noqa: E402
from transformer.logging import check_trackers  # noqa: E402
from transformer.trainer import train  # noqa: E402

from .test_train import compose_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def overrides(corpus: Path, cache: Path, max_steps: int, *extra: str) -> list[str]:
    """A tiny model on the toy corpus: scalars every 2 steps, a validation with 2 text
    samples and a checkpoint every 4."""
    return ["debug=fast", "data=parallel_files", f"data.root={corpus}",
            f"data.cache_dir={cache}", f"trainer.max_steps={max_steps}",
            "trainer.val_every_steps=4", "trainer.save_every_steps=4",
            "trainer.log_every_steps=2", "trainer.val_max_sentences=4",
            "logger.attention_maps=false", "logger.n_examples=2", *extra]


def train_and_resume(corpus: Path, cache: Path, run_dir: Path, *extra: str) -> None:
    """4 steps, then a resumed run to 8: the trackers must continue their runs."""
    train(compose_config(overrides(corpus, cache, 4, *extra)), run_dir)
    train(compose_config(overrides(corpus, cache, 8, *extra, "trainer.resume=auto")), run_dir)


def tensorboard_logs(run_dir: Path) -> tuple[dict, dict]:
    """``({(tag, step): value}, {(tag, step): text})`` of the run's TensorBoard events."""
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {(tag, e.step): e.value for tag in events.Tags()["scalars"]
               for e in events.Scalars(tag)}
    texts = {(tag.removesuffix("/text_summary"), e.step):
             e.tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]
             if tag.endswith("/text_summary") for e in events.Tensors(tag)}
    return scalars, texts


def assert_same_scalars(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    assert len({tag for tag, _ in expected}) >= 5 and {step for _, step in expected} >= {2, 8}
    for key, value in expected.items():  # TensorBoard keeps float32
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key


def wandb_records(path: Path):
    """The protobuf records of a W&B transaction log (``run-<id>.wandb``): LevelDB's log
    format (32 KiB blocks of records with a 7-byte header: checksum, length, type) after
    W&B's 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, pieces = 7, []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header: padding
            position += block - position % block
            continue
        length = int.from_bytes(data[position + 4:position + 6], "little")
        kind = data[position + 6]  # 1 whole, 2 first, 3 middle, 4 last piece of a record
        pieces.append(data[position + 7:position + 7 + length])
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            pieces = []
            yield record
        elif kind == 0:  # zeros to the end of the block
            pieces = []
            position += block - position % block


def finished_records(path: Path, timeout_s: float = 60.0) -> list:
    """The records of a W&B run's log once it holds the run's "exit" record: W&B's service
    process may still be writing the file when ``finish()`` has returned."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            records = list(wandb_records(path))
        except DecodeError:  # the last record half written
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{path} has no exit record"
        time.sleep(0.2)


def test_logger_choices_compose():
    for choice, on in [(None, {"tensorboard"}), ("wandb", {"wandb"}), ("mlflow", {"mlflow"}),
                       ("[tensorboard,wandb]", {"tensorboard", "wandb"}),
                       ("[tensorboard,wandb,mlflow]", {"tensorboard", "wandb", "mlflow"}),
                       ("[]", set())]:
        cfg = compose_config([f"logger={choice}"] if choice else [])
        assert {t for t in ("tensorboard", "wandb", "mlflow") if cfg.logger[t]} == on, choice


def test_wandb_offline_logs_what_tensorboard_logs_and_resumes_its_run(
        corpus, cache, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # leave pytest's output capture alone
    run_dir = tmp_path / "run"
    train_and_resume(corpus, cache, run_dir, "logger=[tensorboard,wandb]")
    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert [run.name.rsplit("-", 1)[1] for run in runs] == [run_id, run_id]  # one W&B run
    scalars, texts, config = {}, {}, {}
    for run in runs:
        for record in finished_records(run / f"run-{run_id}.wandb"):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                row: dict = {}
                for item in record.history.item:  # a dict value comes as nested keys
                    *parents, key = list(item.nested_key) or [item.key]
                    node = row
                    for parent in parents:
                        node = node.setdefault(parent, {})
                    node[key] = json.loads(item.value_json)
                step = row["trainer/step"]
                for tag, value in row.items():
                    if isinstance(value, dict) and value.get("_type") == "table-file":
                        table = json.loads((run / "files" / value["path"]).read_text())
                        texts.update({(tag, s): text for s, text in table["data"]})
                    elif not tag.startswith("_") and tag != "trainer/step":
                        scalars[(tag, step)] = value
            elif kind in ("config", "run"):
                updates = record.config.update if kind == "config" else record.run.config.update
                config.update({item.key: json.loads(item.value_json) for item in updates})
    expected_scalars, expected_texts = tensorboard_logs(run_dir)
    assert_same_scalars(scalars, expected_scalars)
    assert texts == expected_texts and {step for _, step in texts} == {4, 8}
    assert config["model.d_model"] == 32 and config["trainer.max_steps"] == 8  # the newest


def test_mlflow_file_store_logs_what_tensorboard_logs_and_resumes_its_run(
        corpus, cache, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for a database
    store = f"file://{tmp_path / 'mlruns'}"
    run_dir = tmp_path / "run"
    train_and_resume(corpus, cache, run_dir, "logger=[tensorboard,mlflow]",
                     f"logger.mlflow_tracking_uri={store}")
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("transformer").experiment_id])
    assert run.info.run_id == json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    assert run.info.status == "FINISHED"
    scalars = {(tag, m.step): m.value for tag in run.data.metrics
               for m in client.get_metric_history(run.info.run_id, tag)}
    expected_scalars, expected_texts = tensorboard_logs(run_dir)
    assert_same_scalars(scalars, expected_scalars)
    texts = {}
    for tag in {tag for tag, _ in expected_texts}:
        for info in client.list_artifacts(run.info.run_id, tag):
            step = int(Path(info.path).stem.removeprefix("step_"))
            path = client.download_artifacts(run.info.run_id, info.path, str(tmp_path))
            texts[(tag, step)] = Path(path).read_text()
    assert texts == expected_texts and {step for _, step in texts} == {4, 8}
    assert run.data.params["model.d_model"] == "32"
    assert run.data.params["trainer.max_steps"] == "4"  # MLflow keeps a param's first value


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_missing_package_is_refused_in_one_line(tracker, monkeypatch):
    monkeypatch.setitem(sys.modules, tracker, None)  # import fails
    cfg = compose_config([f"logger=[tensorboard,{tracker}]"])
    with pytest.raises(ConfigError, match=rf'^logger={tracker} needs the {tracker} package: '
                                          rf'pip install -e "\.\[{tracker}\]"$'):
        check_trackers(cfg.logger)


def test_train_py_refuses_a_missing_package_before_any_work(tmp_path):
    blocker = tmp_path / "blocked" / "wandb"  # an importable wandb that fails to import
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('blocked for the test')\n")
    env = {**os.environ, "PYTHONPATH": f"{blocker.parent}{os.pathsep}{REPO}",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "logger=wandb",
                             "debug=fast", f"hydra.run.dir={tmp_path / 'run'}"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr == ('error: logger=wandb needs the wandb package: '
                             'pip install -e ".[wandb]"\n')
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_store_mlflow_cannot_use_is_refused_in_one_line():
    from transformer.logging import MlflowLogger

    with pytest.raises(ConfigError, match=r"^logger=mlflow: MLflow cannot log to nope://x: "
                                          r"[^\n]*\(set logger.mlflow_tracking_uri or "
                                          r"\$MLFLOW_TRACKING_URI\)$"):
        MlflowLogger("nope://x", "transformer", "a run", None)
