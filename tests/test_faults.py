"""Faults and bad input, end to end on the CPU: kill -9 at any step and inside a checkpoint
write, SIGTERM/SIGINT (preemption), corrupt checkpoints, a full disk, non-finite steps, and
property-based bad configs and bad corpora. A run that meets a fault and is resumed with
``trainer.resume=auto`` ends bitwise equal to one that never met it: weights, optimizer
state and the logged ``train/*`` curves."""

from __future__ import annotations

import copy
import errno
import gzip
import io
import itertools
import logging
import math
import multiprocessing
import os
import queue
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import typing
from pathlib import Path

import pytest
import torch
from hydra.errors import HydraException
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import transformer.checkpoint as checkpoint_module
import transformer.training.loop as loop_module
import transformer.training.step as step_module
from tests.test_train import compose_config, scalar_values
from transformer.checkpoint import (
    CheckpointError,
    latest_valid_checkpoint,
    read_checkpoint,
    step_checkpoints,
    step_of,
    write_checkpoints,
)
from transformer.components import PARTS
from transformer.config import (
    CHOICES,
    ConfigError,
    DataConfig,
    LoggerConfig,
    ModelConfig,
    OptimConfig,
    SchedConfig,
    TrainerConfig,
)
from transformer.data import DataError, TokenBatchSampler, collate, prepare_data, read_lines
from transformer.trainer import batch_loss, find_resume, train

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 40  # seven epochs of the toy corpus (six batches each), about 25 ms a step
CURVES = ("train/loss", "train/nll_loss", "train/lr", "train/grad_norm")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def run_overrides(corpus: Path, cache: Path, max_steps: int, *extra: str) -> list[str]:
    """A tiny model on the toy corpus: a log line every 2 steps, a checkpoint every 4."""
    return ["debug=fast", "data=parallel_files", f"data.root={corpus}",
            f"data.cache_dir={cache}", f"trainer.max_steps={max_steps}",
            "trainer.val_every_steps=1000", "trainer.save_every_steps=4",
            "trainer.log_every_steps=2", "model.dropout=0.1", "logger.attention_maps=false",
            *extra]


@pytest.fixture(scope="module")
def straight(corpus, cache, tmp_path_factory) -> Path:
    """An uninterrupted run of MAX_STEPS: what every run that met a fault must equal."""
    run_dir = tmp_path_factory.mktemp("straight")
    train(compose_config(run_overrides(corpus, cache, MAX_STEPS)), run_dir)
    return run_dir


def assert_same_run(run_dir: Path, expected_dir: Path, curves=CURVES) -> None:
    """Bitwise the same final weights and optimizer state, the same logged curves, and no
    temporary file left beside the checkpoints."""
    got, expected = (read_checkpoint(d / "checkpoints" / "checkpoint_last.pt")
                     for d in (run_dir, expected_dir))
    assert got["step"] == expected["step"]
    for name, tensor in expected["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    for index, state in expected["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(got["optimizer"]["state"][index][key], value), (index, key)
    for tag in curves:  # repr: every bit of a float, and NaN equal to NaN
        assert [(step, repr(value)) for step, value in scalar_values(run_dir, tag)] == [
            (step, repr(value)) for step, value in scalar_values(expected_dir, tag)], tag
    assert not list((run_dir / "checkpoints").glob(".*"))


def train_command(args: list[str]) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *args]


class LiveRun:
    """A command (train.py, torchrun) in the background; its output read as it comes, so
    that a test can act when a line appears. Killed on leaving the ``with`` block."""

    def __init__(self, command: list[str], cwd: Path, new_session: bool = False):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True,
                                        start_new_session=new_session)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def __enter__(self) -> LiveRun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    @property
    def log(self) -> str:
        return "".join(self.output)

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match:
        """The first line from now on that matches ``pattern``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                pytest.fail(f"no line matching {pattern!r} in {timeout} s:\n{self.log[-3000:]}")
            if line is None:
                pytest.fail(f"exited ({self.process.wait()}) before a line matching "
                            f"{pattern!r}:\n{self.log[-3000:]}")
            self.output.append(line)
            if match := re.search(pattern, line):
                return match

    def finish(self, timeout: float = 120) -> str:
        """Wait for the exit; the whole output."""
        self.process.wait(timeout=timeout)
        while (line := self.lines.get(timeout=30)) is not None:
            self.output.append(line)
        return self.log


# ----------------------------------------------------------------------------- kill -9

def test_kill_9_at_any_step_then_resume_auto_gives_the_uninterrupted_run(straight, corpus,
                                                                         cache, tmp_path):
    run_dir = tmp_path / "run"
    command = train_command([*run_overrides(corpus, cache, MAX_STEPS), "trainer.resume=auto",
                             f"hydra.run.dir={run_dir}"])
    delays = random.Random(0)
    for trigger in (r"step 10 \|", r"step 26 \|"):  # the second kill hits a resumed run
        with LiveRun(command, tmp_path) as run:
            run.wait_for(trigger)
            time.sleep(delays.uniform(0, 0.1))  # somewhere in the steps after that line
            run.process.kill()
            run.finish()
        assert run.process.returncode == -signal.SIGKILL, run.log[-3000:]
    resumed = re.search(r"resumed at step (\d+)", run.log)  # the second run's start
    assert resumed and int(resumed.group(1)) >= 8, run.log[-3000:]  # saved after step 8
    # The last rerun in this process: the same train() that train.py calls, without the
    # four seconds a new Python spends importing torch.
    train(compose_config([*run_overrides(corpus, cache, MAX_STEPS), "trainer.resume=auto"]),
          run_dir)
    assert_same_run(run_dir, straight)


def toy_state(step: int) -> dict:
    """A checkpoint whose 1 MiB of weights all hold its step: a mix-up shows."""
    return {"model": {"weight": torch.full((512, 512), float(step))}, "config": {},
            "tokenizer": {}, "step": step}


def assert_holds_its_step(path: Path) -> dict:
    state = read_checkpoint(path)
    if path.name != "checkpoint_last.pt":
        assert state["step"] == step_of(path), path
    assert torch.all(state["model"]["weight"] == state["step"]), path
    return state


# A child that saves step 4, then stalls half-way through writing step 8 until killed.
STALLED_WRITE = """
import io, sys, time
import torch
from tests.test_faults import toy_state
from transformer.checkpoint import write_checkpoints

write_checkpoints(toy_state(4), sys.argv[1])
save = torch.save

def half_then_stall(state, file):
    whole = io.BytesIO()
    save(state, whole)
    file.write(whole.getvalue()[:whole.tell() // 2])
    file.flush()
    print("half written", flush=True)
    time.sleep(600)

torch.save = half_then_stall
write_checkpoints(toy_state(8), sys.argv[1])
"""


def test_kill_9_inside_a_checkpoint_write_leaves_the_previous_one_in_use(tmp_path):
    with LiveRun([sys.executable, "-c", STALLED_WRITE, str(tmp_path)], REPO) as run:
        run.wait_for("half written")
        run.process.kill()
        run.finish()
    half = tmp_path / f".checkpoint_8.pt.tmp-{run.process.pid}"
    assert half.stat().st_size > 0  # the kill came inside the write
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(half)  # what no reader may take for a checkpoint
    assert step_checkpoints(tmp_path) == [tmp_path / "checkpoint_4.pt"]
    path, state = latest_valid_checkpoint(tmp_path)
    assert path.name == "checkpoint_last.pt" and state["step"] == 4
    assert_holds_its_step(path)
    write_checkpoints(toy_state(8), tmp_path)  # the next save clears what the kill left
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint_4.pt", "checkpoint_8.pt", "checkpoint_last.pt"]


def save_until_killed(directory: Path, step: int) -> None:
    """A forked child: training saves (keep_last=2) from ``step`` on, until it is killed."""
    while True:
        step += 1
        write_checkpoints(toy_state(step), directory, keep_last=2)


KILLS = 20


def test_kill_9_at_random_moments_of_saving_never_leaves_a_bad_checkpoint(tmp_path):
    moments, fork = random.Random(0), multiprocessing.get_context("fork")
    newest = inside_a_write = 0
    for _ in range(KILLS):
        child = fork.Process(target=save_until_killed, args=(tmp_path, newest))
        child.start()
        deadline = time.monotonic() + 30
        while not (tmp_path / f"checkpoint_{newest + 1}.pt").exists():  # it is saving
            assert time.monotonic() < deadline, "the child made no checkpoint"
            time.sleep(0.001)
        time.sleep(moments.uniform(0, 0.03))
        child.kill()
        child.join()
        inside_a_write += any(tmp_path.glob(f".*.tmp-{child.pid}"))
        for path in tmp_path.glob("*.pt"):  # whatever the moment, every checkpoint is whole
            assert_holds_its_step(path)
        path, state = latest_valid_checkpoint(tmp_path)
        assert state["step"] > newest  # the newest complete save, never an older one
        newest = state["step"]
    assert inside_a_write > 0, "no kill came inside a write: the test proved nothing"


# ----------------------------------------------------------------------------- SIGTERM / SIGINT

def test_sigterm_saves_at_the_next_step_exits_0_and_resumes_exactly(straight, corpus, cache,
                                                                    tmp_path):
    run_dir = tmp_path / "run"
    overrides = run_overrides(corpus, cache, MAX_STEPS)
    with LiveRun(train_command([*overrides, f"hydra.run.dir={run_dir}"]), tmp_path) as run:
        run.wait_for(r"step 10 \|")
        run.process.send_signal(signal.SIGTERM)
        log = run.finish()
    assert run.process.returncode == 0, log[-3000:]
    stopped = re.search(r"received SIGTERM at step (\d+): saved checkpoint (\S+), exiting; "
                        r"resume with trainer.resume=auto", log)
    assert stopped, log[-3000:]
    step = int(stopped.group(1))
    assert 10 <= step < MAX_STEPS
    assert Path(stopped.group(2)) == run_dir / "checkpoints" / f"checkpoint_{step}.pt"
    assert read_checkpoint(run_dir / "checkpoints" / "checkpoint_last.pt")["step"] == step
    train(compose_config([*overrides, "trainer.resume=auto"]), run_dir)
    assert_same_run(run_dir, straight)


def test_sigint_between_log_lines_resumes_exactly_and_restores_the_handlers(
        straight, corpus, cache, tmp_path, monkeypatch):
    # Ctrl-C during step 7: neither a log (2) nor a save (4) step, so the resumed run must
    # also pick up the half-filled sums of the step-8 log line.
    def ctrl_c_during_step_7(rank: int, step: int) -> None:
        if step == 7:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(loop_module, "maybe_inject_fault", ctrl_c_during_step_7)
    overrides = run_overrides(corpus, cache, MAX_STEPS)
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        train(compose_config(overrides), tmp_path)
    except KeyboardInterrupt:
        pytest.fail("SIGINT was not handled by the trainer")
    assert {number: signal.getsignal(number) for number in handlers} == handlers
    stopped = read_checkpoint(tmp_path / "checkpoints" / "checkpoint_last.pt")
    assert stopped["step"] == 7 and stopped["meter"]["steps"] == 1
    monkeypatch.undo()
    train(compose_config([*overrides, "trainer.resume=auto"]), tmp_path)
    assert_same_run(tmp_path, straight)


def worker_pid(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker of ``rank`` (Linux: /proc)."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    for pid in map(int, children):
        if f"RANK={rank}" in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0"):
            return pid
    raise AssertionError(f"no worker of rank {rank} among {children}")


def test_sigterm_to_one_torchrun_rank_stops_both_at_the_same_step(corpus, cache, tmp_path):
    run_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(REPO / "train.py"),
               *run_overrides(corpus, cache, MAX_STEPS), "trainer.dist_timeout_s=30",
               f"hydra.run.dir={run_dir}"]
    with LiveRun(command, tmp_path) as run:
        run.wait_for(r"step 6 \|")  # rank 0's log line: both ranks are in the loop
        os.kill(worker_pid(run.process.pid, rank=1), signal.SIGTERM)
        log = run.finish(timeout=90)
    assert run.process.returncode == 0, log[-3000:]  # no rank waited for the other in vain
    assert "received SIGTERM: saving a checkpoint after this step" in log  # rank 1's warning
    stopped = re.search(r"received a stop signal \(on another rank\) at step (\d+): saved "
                        r"checkpoint (\S+), exiting", log)
    assert stopped, log[-3000:]
    state = read_checkpoint(stopped.group(2))
    assert state["step"] == int(stopped.group(1)) < MAX_STEPS and state["world_size"] == 2
    assert len(state["rng_per_rank"]) == 2  # both ranks took part in the same save


# ----------------------------------------------------------------------------- corrupt, full disk

def test_a_corrupt_last_checkpoint_falls_back_to_the_previous_one(straight, corpus, cache,
                                                                  tmp_path):
    run_dir = tmp_path / "run"
    overrides = run_overrides(corpus, cache, MAX_STEPS)
    train(compose_config(run_overrides(corpus, cache, 12)), run_dir)
    directory = run_dir / "checkpoints"
    last, numbered = directory / "checkpoint_last.pt", directory / "checkpoint_12.pt"
    assert os.path.samefile(last, numbered)  # a hard link: truncating one truncates both
    os.truncate(last, last.stat().st_size // 2)
    with LiveRun(train_command([*overrides, "trainer.resume=auto",
                                f"hydra.run.dir={run_dir}"]), tmp_path) as run:
        log = run.finish()
    assert run.process.returncode == 0, log[-3000:]
    for path in (last, numbered):
        assert f"checkpoint {path} is truncated or corrupt" in log
    assert f"resuming from {directory / 'checkpoint_8.pt'}" in log
    assert "resumed at step 8" in log
    assert_same_run(run_dir, straight)


def test_resuming_with_other_parameter_groups_names_the_keys(corpus, cache, tmp_path):
    """A run trained without weight decay has one parameter group; resumed with decay (two
    groups: optim.no_decay's parameters apart) it stops with one line naming the keys."""
    train(compose_config(run_overrides(corpus, cache, 2)), tmp_path)
    with pytest.raises(CheckpointError, match="resume with the optim.weight_decay and "
                                              "optim.no_decay it was trained with"):
        train(compose_config(run_overrides(corpus, cache, 4, "optim.weight_decay=0.1",
                                           "trainer.resume=auto")), tmp_path)


def test_validation_translates_all_of_a_split_smaller_than_val_max_sentences(corpus, cache,
                                                                              tmp_path):
    """debug=fast asks for 32 val sentences; a valid split of 40 with 100 asked must give
    BLEU over its 40 (an IndexError past the split's end, before)."""
    best = train(compose_config(run_overrides(corpus, cache, 2, "trainer.val_every_steps=2",
                                              "trainer.val_max_sentences=100")), tmp_path)
    assert 0.0 <= best <= 100.0


def test_resume_auto_takes_the_newest_checkpoint_that_loads(tmp_path):
    directory = tmp_path / "checkpoints"
    for step in (4, 8):
        write_checkpoints(toy_state(step), directory)
    # checkpoint_last.pt replaced by garbage: the newest numbered one
    (directory / "checkpoint_last.pt").unlink()
    (directory / "checkpoint_last.pt").write_bytes(b"garbage")
    assert latest_valid_checkpoint(directory)[0] == directory / "checkpoint_8.pt"
    # killed between writing checkpoint_12.pt and linking checkpoint_last.pt to it
    write_checkpoints(toy_state(8), directory)
    checkpoint_module.save_checkpoint(toy_state(12), directory / "checkpoint_12.pt")
    assert latest_valid_checkpoint(directory)[0] == directory / "checkpoint_12.pt"
    # none loads: an error naming the folder, not a fresh start beside them
    for path in directory.glob("*.pt"):
        path.unlink()
        path.write_bytes(b"garbage")
    assert latest_valid_checkpoint(directory) is None
    with pytest.raises(CheckpointError, match=re.escape(f"no checkpoint in {directory} loads")):
        find_resume("auto", tmp_path)
    corrupt = directory / "checkpoint_12.pt"
    with pytest.raises(CheckpointError, match=re.escape(f"{corrupt} is truncated or corrupt")):
        find_resume(str(corrupt), tmp_path)


class FullDiskFile(io.FileIO):
    """A file on a disk with 4 KiB free: the write that needs more raises ENOSPC."""

    def write(self, data) -> int:
        room = max(4096 - self.tell(), 0)
        if len(data) > room:
            super().write(memoryview(data)[:room])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def fill_disk_after(saves: int, where: str, monkeypatch) -> None:
    """The first ``saves`` checkpoint writes go through; then the disk is full, as seen in
    ``where``: a write (torch.save's) or the fsync (delayed allocation, network disks)."""
    calls = itertools.count(1)
    if where == "write":
        monkeypatch.setattr(checkpoint_module, "open", lambda path, mode: (
            open if next(calls) <= saves else FullDiskFile)(path, mode), raising=False)
        return
    fsync = os.fsync

    def full_fsync(fd: int) -> None:
        if next(calls) > saves:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(checkpoint_module.os, "fsync", full_fsync)


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_a_full_disk_names_the_file_and_keeps_the_last_checkpoint(where, straight, corpus,
                                                                  cache, tmp_path, monkeypatch):
    overrides = run_overrides(corpus, cache, MAX_STEPS)
    directory = tmp_path / "checkpoints"
    fill_disk_after(1, where, monkeypatch)
    with pytest.raises(CheckpointError, match=re.escape(
            f"could not write checkpoint {directory / 'checkpoint_8.pt'}: No space left on "
            "device")):
        train(compose_config(overrides), tmp_path)
    assert sorted(path.name for path in directory.iterdir()) == [
        "checkpoint_4.pt", "checkpoint_last.pt"]  # no temporary file left
    assert read_checkpoint(directory / "checkpoint_last.pt")["step"] == 4
    monkeypatch.undo()  # space freed: resume
    train(compose_config([*overrides, "trainer.resume=auto"]), tmp_path)
    assert_same_run(tmp_path, straight)


# ----------------------------------------------------------------------------- non-finite steps

def test_an_absurd_lr_stops_train_py_after_max_skipped_steps(corpus, cache, tmp_path):
    run_dir = tmp_path / "run"
    with LiveRun(train_command([*run_overrides(corpus, cache, MAX_STEPS), "optim.lr=1e30",
                                "trainer.max_skipped_steps=3", f"hydra.run.dir={run_dir}"]),
                 tmp_path) as run:
        log = run.finish()
    assert run.process.returncode == 2, log[-3000:]
    assert re.search(r"error: 3 steps in a row had non-finite loss or gradients \(step \d+\); "
                     r"lower optim.lr", log), log[-3000:]
    assert "Traceback" not in log
    skipped = scalar_values(run_dir, "train/skipped_steps")
    first = skipped[0][0]  # three tries of the same update
    assert skipped == [(first, 1.0), (first, 2.0), (first, 3.0)]


def inject_nan(steps: set[int], monkeypatch) -> None:
    """The loss of the first try at each update of ``steps`` (one micro-batch each) becomes
    NaN, as a bad batch or an fp16 overflow makes it: that step is skipped, and the next
    batch tries the same update again. Update numbers are the run's, resumed or not."""
    current, tried = {"step": 0}, set()

    def note_step(rank: int, step: int) -> None:
        if step < current["step"]:  # another run in this test: its own first tries
            tried.clear()
        current.update(step=step, nan=step in steps and step not in tried)
        tried.add(step)

    monkeypatch.setattr(loop_module, "maybe_inject_fault", note_step)

    def nan_loss(model, batch, label_smoothing, pad_id=0):
        loss_sum, nll_sum = batch_loss(model, batch, label_smoothing, pad_id)
        return (loss_sum * math.nan if current["nan"] else loss_sum), nll_sum

    monkeypatch.setattr(step_module, "batch_loss", nan_loss)


def test_nan_steps_are_skipped_counted_and_training_goes_on(corpus, cache, tmp_path,
                                                           monkeypatch):
    inject_nan({5, 6}, monkeypatch)
    train(compose_config(run_overrides(corpus, cache, 8)), tmp_path)
    last = read_checkpoint(tmp_path / "checkpoints" / "checkpoint_last.pt")
    assert last["step"] == 8
    assert last["train_state"]["batch_in_epoch"] == 4  # 10 batches tried, 6 an epoch
    assert last["train_state"]["skipped_steps"] == 2
    assert last["train_state"]["skipped_in_a_row"] == 0
    assert scalar_values(tmp_path, "train/skipped_steps") == [(5, 1.0), (6, 2.0)]


@pytest.mark.parametrize("precision", ["fp32", "fp32-not-fused", "fp16"])
def test_a_skipped_step_advances_neither_the_schedule_nor_the_update_count(
        precision, corpus, cache, tmp_path, monkeypatch):
    """A run whose 5th step is skipped (NaN loss) takes one more step and ends as a run that
    never met it: the same update count, LR schedule and Adam step counts. With the same
    batch at every step and no dropout, in fp32 it ends bitwise equal to it, weights,
    optimizer state and logged curves (fp16: the GradScaler backed off in one of them)."""
    extra = {"fp32": [], "fp32-not-fused": ["optim.fused=false"],
             "fp16": ["trainer.precision=fp16"]}[precision]
    overrides = run_overrides(corpus, cache, 8, "trainer.overfit_batches=1", "model.dropout=0",
                              *extra)
    train(compose_config(overrides), tmp_path / "clean")
    inject_nan({5}, monkeypatch)
    train(compose_config(overrides), tmp_path / "skipped")
    clean, skipped = (read_checkpoint(tmp_path / run / "checkpoints" / "checkpoint_last.pt")
                      for run in ("clean", "skipped"))
    assert skipped["step"] == clean["step"] == 8
    assert skipped["train_state"]["epoch"] == clean["train_state"]["epoch"] + 1  # one batch more
    assert skipped["train_state"]["skipped_steps"] == 1
    assert skipped["scheduler"] == clean["scheduler"]
    assert skipped["optimizer"]["param_groups"] == clean["optimizer"]["param_groups"]
    assert {int(state["step"]) for state in skipped["optimizer"]["state"].values()} == {8}
    assert scalar_values(tmp_path / "skipped", "train/skipped_steps") == [(5, 1.0)]
    if precision == "fp16":
        assert skipped["scaler"]["scale"] == clean["scaler"]["scale"] / 2
        curves = ("train/lr",)
    else:
        assert_same_run(tmp_path / "skipped", tmp_path / "clean")
        curves = CURVES
    for tag in curves:
        assert scalar_values(tmp_path / "skipped", tag) == scalar_values(tmp_path / "clean", tag)


def test_fp16_grad_scaler_state_survives_resume(corpus, cache, tmp_path, monkeypatch):
    # A NaN at step 3 makes the GradScaler back off: a scale a fresh scaler would not have.
    inject_nan({3}, monkeypatch)
    fp16 = ["trainer.precision=fp16"]
    train(compose_config(run_overrides(corpus, cache, 12, *fp16)), tmp_path / "straight")
    train(compose_config(run_overrides(corpus, cache, 8, *fp16)), tmp_path / "resumed")
    saved = read_checkpoint(tmp_path / "resumed" / "checkpoints" / "checkpoint_last.pt")
    # Backed off at the skipped step, then 6 applied steps (updates 3 to 8) since.
    assert saved["scaler"]["scale"] == 2.0**15 and saved["scaler"]["_growth_tracker"] == 6
    seen, fit = {}, loop_module.fit

    def fit_noting_the_scaler(run) -> None:
        seen.update(run.scaler.state_dict())
        fit(run)

    monkeypatch.setattr(loop_module, "fit", fit_noting_the_scaler)
    train(compose_config(run_overrides(corpus, cache, 12, *fp16, "trainer.resume=auto")),
          tmp_path / "resumed")
    assert seen == saved["scaler"]
    assert_same_run(tmp_path / "resumed", tmp_path / "straight",
                    curves=(*CURVES, "train/loss_scale", "train/skipped_steps"))


# ----------------------------------------------------------------------------- bad configs

GROUPS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig,
          "sched": SchedConfig, "trainer": TrainerConfig, "logger": LoggerConfig}


def value_type(hint: typing.Any) -> typing.Any:
    """int for ``int`` and ``int | None``; list for ``list[float]``; dict for
    ``dict[str, Any] | None`` (a model part's entry)."""
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    origin = typing.get_origin(hint)
    if origin is list:
        return list
    return dict if args and typing.get_origin(args[0]) is dict else (args[0] if args else hint)


KEYS = {f"{group}.{name}": value_type(hint) for group, schema in GROUPS.items()
        for name, hint in typing.get_type_hints(schema).items()}
NOT_A = {int: ["abc", 1.5, [1, 2], {"a": 1}, True], float: ["abc", [0.5], {"a": 1}, True],
         bool: ["abc", "maybe", 2.5, [True]], list: ["abc", 0.5, {"a": 1}],
         str: [[1, 2], {"a": 1}], dict: ["abc", 1.5, [1, 2], True]}  # any text is a string
# Counts that may be zero; every other int key is a size or a count that must be positive.
MAY_BE_ZERO = {"sched.warmup_steps", "trainer.overfit_batches", "logger.n_examples",
               "data.prefetch",  # 0: no prefetching thread
               "trainer.max_steps"}  # 0 steps: save the starting point (a converted model)
OTHER_INTS = {"trainer.seed": st.integers(max_value=-1) | st.integers(min_value=2**32),
              "model.pad_id": st.integers().filter(lambda value: value != 0)}
FRACTION = re.compile(r"dropout|label_smoothing")


def out_of_range(key: str) -> st.SearchStrategy:
    """Values ``key`` must refuse: a size of zero or less, a fraction outside [0, 1), a
    negative rate, NaN, an infinite learning rate."""
    if key in OTHER_INTS:
        return OTHER_INTS[key]
    if KEYS[key] is int:
        return st.integers(max_value=-1 if key in MAY_BE_ZERO else 0)
    negative, nan = st.floats(max_value=-sys.float_info.min), st.just(math.nan)
    if FRACTION.search(key):
        return negative | st.floats(min_value=1) | nan
    if key == "optim.lr":
        return st.floats(max_value=0) | st.sampled_from([math.nan, math.inf])
    return negative | nan


NUMBERS = sorted([key for key, kind in KEYS.items() if kind in (int, float)])
CONFIG_GROUPS = ("model", "data", "optim", "sched", "trainer", "logger", "debug", "experiment",
                 *(f"model/{part}" for part in PARTS))
NAME = st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True)


@pytest.fixture(scope="module")
def fail_fast(corpus, cache, tmp_path_factory):
    """``fail_fast(changes, named)``: the toy run with ``changes`` fails, in composing or in
    train() before its first step, with a message that holds ``named`` (a key or a file),
    and leaves no checkpoint that a later trainer.resume=auto would take for a run.
    ``changes``: override strings, composed by Hydra as train.py composes them (0.15 s), or
    ``{key: value}`` set on the config composed once (a millisecond; Hydra applies an
    override the same way, so the same typed schema checks the value)."""
    runs = tmp_path_factory.mktemp("bad_configs")
    base = run_overrides(corpus, cache, 2)
    composed = compose_config(base)

    def configured(changes: list[str] | dict[str, typing.Any]) -> DictConfig:
        if isinstance(changes, list):
            return compose_config([*base, *changes])
        cfg = copy.deepcopy(composed)
        for key, value in changes.items():
            OmegaConf.update(cfg, key, value)
        return cfg

    def check(changes: list[str] | dict[str, typing.Any], named: str) -> None:
        run_dir = Path(tempfile.mkdtemp(dir=runs))
        try:
            cfg = configured(changes)
        except (HydraException, OmegaConfBaseException) as error:
            message = str(error)
        else:
            with pytest.raises((ConfigError, DataError, CheckpointError)) as error:
                train(cfg, run_dir)
            message = str(error.value)
        assert named in message, message
        assert not (run_dir / "checkpoints").exists()

    return check


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_a_value_of_the_wrong_type_names_its_key(data, fail_fast):
    key = data.draw(st.sampled_from(sorted(KEYS)))
    fail_fast({key: data.draw(st.sampled_from(NOT_A[KEYS[key]]))}, f"full_key: {key}")


TOP_LEVEL = {*GROUPS, *CONFIG_GROUPS, "hydra", "hparams_search", "test"}


@settings(max_examples=40, deadline=None)
@given(group=st.sampled_from(["", *GROUPS]), name=NAME)
def test_an_unknown_key_is_named(group, name, fail_fast):
    key = f"{group}.{name}" if group else name
    assume(key not in KEYS and key not in TOP_LEVEL)
    fail_fast({key: 1}, f"full_key: {key}")


@settings(max_examples=10, deadline=None)
@given(group=st.sampled_from(CONFIG_GROUPS), name=NAME)
def test_an_unknown_config_group_option_is_named(group, name, fail_fast):
    assume(name != "null" and not (REPO / "configs" / group / f"{name}.yaml").exists())
    fail_fast([f"{group}={name}"], f"{group}/{name}")


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_an_out_of_range_value_names_its_key(data, fail_fast):
    key = data.draw(st.sampled_from(NUMBERS))
    fail_fast({key: data.draw(out_of_range(key))}, f"{key}=")


@settings(max_examples=20, deadline=None)
@given(n_heads=st.integers(2, 16), head_size=st.integers(1, 8), rest=st.integers(1, 15))
def test_d_model_not_divisible_by_n_heads_names_both(n_heads, head_size, rest, fail_fast):
    d_model = n_heads * head_size + 1 + rest % (n_heads - 1)  # rest in [1, n_heads)
    fail_fast({"model.d_model": d_model, "model.n_heads": n_heads},
              f"model.d_model={d_model} is not divisible by model.n_heads={n_heads}")


@settings(max_examples=40, deadline=None)
@given(key=st.sampled_from(sorted(CHOICES)), value=NAME)
def test_an_unknown_choice_names_its_key(key, value, fail_fast):
    assume(value not in CHOICES[key])
    fail_fast({key: value}, f"{key}={value!r} is not one of")


MISSING = {  # what: (key, value, the text the message must hold); {name}: a random name
    "data root": ("data.root", "/nonexistent/{name}", "data.root=/nonexistent/{name}"),
    "resume file": ("trainer.resume", "/nonexistent/{name}.pt", "/nonexistent/{name}.pt"),
    "init_from file": ("trainer.init_from", "/nonexistent/{name}.pt", "/nonexistent/{name}.pt"),
    "resume not a checkpoint": ("trainer.resume", "{corpus}/train.en", "{corpus}/train.en"),
    "cache under a file": ("data.cache_dir", "{corpus}/train.en/{name}", "data.cache_dir="),
    "train split": ("data.train_split", "{name}", "split '{name}' not found"),
    "language": ("data.src_lang", "{name}", "not found for {name}-de"),
}


@settings(max_examples=40, deadline=None)
@given(what=st.sampled_from(sorted(MISSING)), name=NAME)
def test_a_missing_file_or_folder_is_named(what, name, fail_fast, corpus):
    assume(name not in ("train", "valid", "en", "de"))
    key, value, named = (text.format(name=name, corpus=corpus) for text in MISSING[what])
    fail_fast({key: value}, named)


def test_trainer_device_cuda_without_a_gpu_names_the_key(fail_fast, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fail_fast({"trainer.device": "cuda"}, "trainer.device=cuda but no CUDA device")


@pytest.mark.parametrize("override,message", [
    ("model.dropout=1.5", "model.dropout=1.5 must be in [0, 1)"),
    ("trainer.resume=/nonexistent/run.pt", "checkpoint not found: /nonexistent/run.pt"),
])
def test_train_py_exits_2_with_one_line_and_leaves_nothing_to_resume(override, message, corpus,
                                                                     cache, tmp_path):
    run_dir = tmp_path / "run"
    with LiveRun(train_command([*run_overrides(corpus, cache, 2), override,
                                f"hydra.run.dir={run_dir}"]), tmp_path) as run:
        log = run.finish()
    assert run.process.returncode == 2, log[-3000:]
    assert f"error: {message}" in log.splitlines()
    assert "Traceback" not in log
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize("valid,message", [
    (([" ", "", "a"], ["x", "y", ""]),
     r"split 'valid' \(data.valid_split\) has no pairs left to validate on: 3 read, dropped 3 "
     r"\(3 empty\)$"),
    ((["word " * 40] * 2, ["x", "y"]),  # data.allow_long_eval=false (the default)
     r"line 1 of .*/valid\.en and .*: .* more than data\.max_len=32; set "
     r"data\.allow_long_eval=true to keep such valid pairs truncated$"),
], ids=["all-empty", "all-too-long"])
def test_a_valid_split_without_usable_pairs_stops_the_run_before_its_first_step(
        valid, message, write_corpus, toy_pairs, cache, tmp_path, monkeypatch):
    """Not a ZeroDivisionError at the first validation, after the training steps."""
    corpus = write_corpus({"train": toy_pairs(300, seed=1), "valid": valid,
                           "test": toy_pairs(4)})

    def no_step(*args, **kwargs):
        raise AssertionError("a training step ran")

    monkeypatch.setattr(loop_module, "train_step", no_step)
    with pytest.raises(DataError, match=message):
        train(compose_config(run_overrides(corpus, cache, 4, "data.max_len=32")), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_train_logs_how_many_pairs_each_split_dropped_and_why(write_corpus, toy_pairs, cache,
                                                              tmp_path, caplog):
    (src, tgt), (valid_src, valid_tgt) = toy_pairs(300, seed=1), toy_pairs(40, seed=2)
    corpus = write_corpus({"train": ([*src, "", "word " * 40], [*tgt, "x", "y"]),
                           "valid": ([*valid_src, " "], [*valid_tgt, "z"]), "test": toy_pairs(4)})
    for run in ("corpus", "cache"):  # the second run reads the encoded splits from the cache
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="transformer"):
            train(compose_config(run_overrides(corpus, cache, 1, "data.max_len=32")),
                  tmp_path / run)
        assert f"train: 300 of 302 pairs kept, dropped 2 (1 empty, 1 too long); from {run}" \
            in caplog.text
        assert f"valid: 40 of 41 pairs kept, dropped 1 (1 empty); from {run}" in caplog.text


# ----------------------------------------------------------------------------- bad corpora

LINE = (st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"),
                max_size=30)
        | st.sampled_from(["", " ", "\t", "\r", "\x00", "a\x00b", "\x1b[1mbold\x1b[0m",
                           "\u2028", "\ufeff", "\x85", "é" * 200, "word " * 80]))


FAULTS = ["none", "none", "none", "one side a line longer", "raw bytes"]


@st.composite
def corpus_files(draw) -> dict[str, bytes]:
    """train.{en,de} and valid.{en,de}: arbitrary lines, \\n or \\r\\n, plain or gzip;
    in two examples out of five, one file has a line more than its twin, or a few raw
    bytes (often not UTF-8)."""
    fault, faulty = draw(st.sampled_from(FAULTS)), draw(st.sampled_from(["train", "valid"]))
    gz, files = draw(st.booleans()), {}
    for split in ("train", "valid"):
        pairs = draw(st.lists(st.tuples(LINE, LINE), max_size=10))
        sides = [[src for src, _ in pairs], [tgt for _, tgt in pairs]]
        if split == faulty and fault == "one side a line longer":
            sides[draw(st.integers(0, 1))].append(draw(LINE))
        for lang, lines in zip(("en", "de"), sides, strict=True):
            newline = draw(st.sampled_from(["\n", "\r\n"])).encode()
            data = newline.join(line.encode() for line in lines)
            data += newline if lines and draw(st.booleans()) else b""
            if split == faulty and lang == "en" and fault == "raw bytes":
                at = draw(st.integers(0, len(data)))
                data = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
            name = f"{split}.{lang}"
            files[name + ".gz" if gz else name] = gzip.compress(data) if gz else data
    return files


def is_subsequence(part: list, whole: list) -> bool:
    rest = iter(whole)
    return all(item in rest for item in part)


@settings(max_examples=150, deadline=None)
@given(files=corpus_files(), allow_long_eval=st.booleans())
def test_any_corpus_gives_batches_or_one_data_error_naming_the_file(files, allow_long_eval):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for name, data in files.items():
            (root / name).write_bytes(data)
        cfg = DataConfig(source="parallel_files", root=str(root), valid_split="valid",
                         test_splits=[], vocab_size=300, max_len=32, max_tokens=128,
                         allow_long_eval=allow_long_eval, cache_dir=str(root / "cache"))
        try:
            data = prepare_data(cfg, log=lambda _: None)
        except DataError as error:
            assert str(root) in str(error) and "\n" not in str(error), str(error)
            event(f"DataError: {re.sub(r'[(:].*|/[^ ]*|[0-9]+', '', str(error))}")
            return
        for name, split in data.splits.items():
            src_lines, tgt_lines = (read_lines(path) for path in sorted(root.glob(f"{name}.*"),
                                                                          reverse=True))
            stats = split.stats
            assert stats.read == len(src_lines) == len(tgt_lines)  # no pair lost unseen
            assert stats.read == stats.kept + sum(stats.dropped.values())
            pairs = [(src, tgt) for src, tgt in zip(src_lines, tgt_lines, strict=True)
                     if src.strip() and tgt.strip()]
            assert stats.dropped["empty"] == stats.read - len(pairs)
            kept = list(zip(split.src_text, split.tgt_text, strict=True))
            assert len(kept) == stats.kept and is_subsequence(kept, pairs)
            if name == "valid":  # never dropped: kept whole, or truncated and counted
                assert kept == pairs
            covered = []
            for indices in TokenBatchSampler.for_split(split, cfg.max_tokens).batches(0):
                batch = collate(split, indices)
                assert batch.src_tokens.numel() <= cfg.max_tokens
                assert batch.tgt_output.numel() <= cfg.max_tokens
                covered += indices
            assert sorted(covered) == list(range(stats.kept))
            event(f"{name}: " + ", ".join(f"{why}" for why, n in stats.dropped.items() if n)
                  + (", truncated" if stats.truncated else "") + (", kept" if kept else ""))


def test_a_new_event_file_sorts_after_the_ones_before_it(tmp_path):
    """TensorBoard reads event files in name order: second, host, pid, counter. A writer
    made in the same second as an earlier file that sorts later by the other fields (here
    a host named "~", as from another machine or a larger pid) must still come after it,
    or the old file's events land after the new ones and its purge marker hides them."""
    from transformer.logging import TensorBoardLogger

    log_dir = tmp_path / "tb"
    first = TensorBoardLogger(log_dir)
    first.scalars({"train/loss": 0.0}, 0)
    first.close()
    [made] = log_dir.glob("events.out.tfevents.*")
    fields = made.name.split(".")
    fields[4] = "~"  # sorts after any host name of letters and digits
    made.rename(log_dir / ".".join(fields))
    for step in (1, 2):  # resumed runs: each purges what came after its checkpoint
        logger = TensorBoardLogger(log_dir, purge_step=step)
        logger.scalars({"train/loss": float(step)}, step)
        logger.close()
    assert scalar_values(tmp_path, "train/loss") == [(0, 0.0), (1, 1.0), (2, 2.0)]
