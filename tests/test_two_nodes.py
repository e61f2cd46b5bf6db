"""Two nodes on one machine: two torchrun agents (``--nnodes=2 --nproc_per_node=1``) meet
through c10d rendezvous on 127.0.0.1 and train over gloo, as two machines would.

They train as one process with the same global batch does, into one run directory that
rank 0 alone writes. When one node dies (its agent and worker killed) or hangs (its
worker stopped), the other fails within ``trainer.dist_timeout_s`` with one line, the
checkpoints on disk are whole, and ``trainer.resume=auto`` finishes the run bitwise equal
to an uninterrupted one; with ``--max-restarts`` torchrun restarts the workers and the run
resumes by itself."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time
import uuid
from contextlib import ExitStack, suppress
from pathlib import Path

import pytest
import torch

from tests.test_faults import LiveRun, assert_same_run, run_overrides
from tests.test_train import compose_config, scalar_values
from transformer.checkpoint import read_checkpoint, step_checkpoints, step_of
from transformer.trainer import train

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 24
TIMEOUT_S = 10  # trainer.dist_timeout_s: how long a rank waits for a silent peer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def agent_command(args: list[str], port: int, run_id: str, host: bool,
                  max_restarts: int = 0) -> list[str]:
    """One node's torchrun agent. ``is_host``: the first agent serves the rendezvous store
    on the endpoint; both name 127.0.0.1, so each must be told which it is."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}",
            f"--rdzv-conf=is_host={int(host)}", f"--max-restarts={max_restarts}",
            str(REPO / "train.py"), *args]


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (Linux: /proc): torchrun starts its workers in sessions
    of their own, so killing the agent's process group would leave them running."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return []
    return [grandchild for child in map(int, children)
            for grandchild in (child, *descendants(child))]


def kill_node(node: LiveRun) -> None:
    """SIGKILL to a node's agent and workers, as a machine that loses power."""
    for pid in [node.process.pid, *descendants(node.process.pid)]:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    node.process.wait()


def start_nodes(stack: ExitStack, args: list[str], cwd: Path, run_id: str,
                **options) -> list[LiveRun]:
    """Both nodes' agents; on leaving ``stack``, whatever is left of them is killed."""
    port = free_port()
    nodes = [stack.enter_context(LiveRun(agent_command(args, port, run_id, host, **options),
                                         cwd)) for host in (True, False)]
    for node in nodes:
        stack.callback(kill_node, node)
    return nodes


def run_nodes(args: list[str], cwd: Path, run_id: str, timeout: float = 180,
              **options) -> str:
    """Both nodes to the end, both successful; their output."""
    with ExitStack() as stack:
        nodes = start_nodes(stack, args, cwd, run_id, **options)
        logs = [node.finish(timeout=timeout) for node in nodes]
    for node, log in zip(nodes, logs, strict=True):
        assert node.process.returncode == 0, log[-3000:]
    return "".join(logs)


def first_line(nodes: list[LiveRun], pattern: str, timeout: float = 120) -> LiveRun:
    """The node whose output first shows a line matching ``pattern``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node in nodes:
            while not node.lines.empty():
                line = node.lines.get()
                if line is None:
                    pytest.fail(f"a node exited before {pattern!r}:\n{node.log[-3000:]}")
                node.output.append(line)
                if re.search(pattern, line):
                    return node
        time.sleep(0.02)
    pytest.fail(f"no line matching {pattern!r} in {timeout} s")


def first_exit(nodes: list[LiveRun], timeout: float) -> LiveRun:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node in nodes:
            if node.process.poll() is not None:
                return node
        time.sleep(0.05)
    pytest.fail(f"no node exited in {timeout} s")


def wait_for_checkpoint(directory: Path, step: int, nodes: list[LiveRun],
                        timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (directory / f"checkpoint_{step}.pt").exists():
        assert all(node.process.poll() is None for node in nodes), "a node exited early"
        assert time.monotonic() < deadline, f"no checkpoint_{step}.pt in {timeout} s"
        time.sleep(0.02)


def assert_checkpoints_whole(directory: Path) -> None:
    """Every checkpoint left on disk loads; no temporary file lies beside them."""
    for path in step_checkpoints(directory):
        assert read_checkpoint(path)["step"] == step_of(path)
    assert not list(directory.glob(".*"))


LOST = (r"error: rank \d lost another rank of the job \((?P<why>.+)\): a process or node "
        r"died or hangs .*trainer\.resume=auto")


@pytest.fixture(scope="module")
def straight_on_two_nodes(corpus, cache, tmp_path_factory) -> Path:
    """An uninterrupted two-node run of MAX_STEPS (dropout on: each rank its own masks)."""
    cwd = tmp_path_factory.mktemp("straight_two_nodes")
    run_nodes([*run_overrides(corpus, cache, MAX_STEPS), f"hydra.run.dir={cwd / 'run'}"],
              cwd, f"straight-{uuid.uuid4().hex[:8]}")
    return cwd / "run"


def test_two_nodes_train_as_one_process_with_the_same_global_batch(corpus, cache, tmp_path):
    # Node r's rank takes batches r, r+2, ... of the epoch; one process with grad_accum=2
    # takes both of a step's. Dropout 0: the ranks would draw other masks.
    common = [*run_overrides(corpus, cache, 8), "model.dropout=0"]
    run_id = f"two-nodes-{uuid.uuid4().hex[:8]}"
    output = run_nodes(common, tmp_path, run_id)
    run_dirs = [path.parent for path in tmp_path.rglob(".hydra")]
    assert run_dirs == [tmp_path / "outputs" / "torchrun" / run_id]  # one for both nodes
    two_nodes = run_dirs[0]
    assert output.count("done: step 8") == 1  # rank 0 alone logs ...
    assert len(list((two_nodes / "tb").glob("events.*"))) == 1  # ... and writes
    assert "parameters identical on all 2 ranks" in output

    single = tmp_path / "single"
    train(compose_config([*common, "trainer.grad_accum=2"]), single)
    got, expected = (read_checkpoint(d / "checkpoints" / "checkpoint_last.pt")
                     for d in (two_nodes, single))
    assert got["world_size"] == 2 and got["step"] == expected["step"] == 8
    for name, tensor in expected["model"].items():
        if name.endswith("k_proj.bias"):  # zero gradient up to rounding: test_distributed.py
            continue
        torch.testing.assert_close(got["model"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    for tag in ("train/loss", "train/nll_loss"):
        assert [v for _, v in scalar_values(two_nodes, tag)] == pytest.approx(
            [v for _, v in scalar_values(single, tag)], rel=1e-4), tag


def test_a_lost_node_fails_the_other_and_resume_auto_finishes_the_same_run(
        straight_on_two_nodes, corpus, cache, tmp_path):
    run_dir = tmp_path / "run"
    args = [*run_overrides(corpus, cache, MAX_STEPS), f"hydra.run.dir={run_dir}",
            f"trainer.dist_timeout_s={TIMEOUT_S}"]
    run_id = f"lost-{uuid.uuid4().hex[:8]}"
    with ExitStack() as stack:
        survivor, lost = start_nodes(stack, args, tmp_path, run_id)
        wait_for_checkpoint(run_dir / "checkpoints", 8, [survivor, lost])
        kill_node(lost)
        killed_at = time.monotonic()
        log = survivor.finish(timeout=TIMEOUT_S + 60)
        failed_after = time.monotonic() - killed_at
    assert survivor.process.returncode != 0
    print(f"the surviving node failed {failed_after:.1f} s after the other was killed")
    assert failed_after < TIMEOUT_S + 30, f"the surviving node took {failed_after:.0f} s"
    assert re.search(LOST, log), log[-3000:]
    assert not re.search(r"\[rank\d\]:\s+File ", log)  # no trace from the worker: one line
    assert_checkpoints_whole(run_dir / "checkpoints")
    stopped_at = read_checkpoint(run_dir / "checkpoints" / "checkpoint_last.pt")["step"]
    assert 8 <= stopped_at < MAX_STEPS

    output = run_nodes([*args, "trainer.resume=auto"], tmp_path, run_id)
    assert f"resumed at step {stopped_at}" in output
    assert_same_run(run_dir, straight_on_two_nodes)


def test_a_hung_node_fails_the_other_after_dist_timeout_s(corpus, cache, tmp_path,
                                                          monkeypatch):
    args = [*run_overrides(corpus, cache, MAX_STEPS), f"hydra.run.dir={tmp_path / 'run'}",
            f"trainer.dist_timeout_s={TIMEOUT_S}"]
    for key, value in (("RANK", "1"), ("STEP", "5"), ("KIND", "stop")):  # rank 1: SIGSTOP
        monkeypatch.setenv(f"TRANSFORMER_FAULT_{key}", value)
    with ExitStack() as stack:
        nodes = start_nodes(stack, args, tmp_path, f"hung-{uuid.uuid4().hex[:8]}")
        hung = first_line(nodes, r"rank 1 stops at step 5")
        stopped_at = time.monotonic()
        survivor = first_exit(nodes, timeout=TIMEOUT_S + 60)
        waited = time.monotonic() - stopped_at
        log = survivor.finish(timeout=30)
    assert survivor is not hung and survivor.process.returncode != 0
    print(f"the other node failed {waited:.1f} s after rank 1 stopped")
    assert TIMEOUT_S - 2 < waited < TIMEOUT_S + 30, f"failed after {waited:.0f} s"
    lost = re.search(LOST, log)
    assert lost and "timed out" in lost["why"].lower(), log[-3000:]


def test_max_restarts_restarts_the_workers_and_the_run_resumes_by_itself(
        straight_on_two_nodes, corpus, cache, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    args = [*run_overrides(corpus, cache, MAX_STEPS), f"hydra.run.dir={run_dir}",
            f"trainer.dist_timeout_s={TIMEOUT_S}", "trainer.resume=auto"]
    # Rank 1 exits at step 10 of the first attempt; both agents then restart their workers
    # in a new rendezvous round, and they resume from checkpoint_8.pt.
    monkeypatch.setenv("TRANSFORMER_FAULT_RANK", "1")
    monkeypatch.setenv("TRANSFORMER_FAULT_STEP", "10")
    # By default (torch 2.13) the workers' process group reuses the rendezvous's TCP store;
    # in a restarted round the new workers' gloo then now and then failed to connect
    # ("connectFullMesh failed ... Connect timeout"), 2 runs in 3. A store of their own
    # (MASTER_ADDR/PORT from the agent) restarted cleanly every time: README, Scaling out.
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    output = run_nodes(args, tmp_path, f"restart-{uuid.uuid4().hex[:8]}", max_restarts=1)
    assert "rank 1 exits at step 10" in output
    assert "resumed at step 8" in output
    assert_checkpoints_whole(run_dir / "checkpoints")
    assert_same_run(run_dir, straight_on_two_nodes)
