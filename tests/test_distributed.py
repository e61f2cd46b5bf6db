"""Data-parallel training with torchrun on the CPU (gloo): the same result as one process
with the same global batch (also across a resume), files from rank 0 only, one run
directory, a clean failure when a rank dies."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from tests.test_train import compose_config, scalar_values
from transformer import Transformer
from transformer.checkpoint import CheckpointError, read_checkpoint
from transformer.distributed import Distributed, run_stamp, wrap_for_training
from transformer.trainer import batch_loss, train

REPO = Path(__file__).resolve().parents[1]
# Dropout 0: ranks draw other dropout masks than one process would; all else is the same.
COMMON = ["debug=fast", "model.dropout=0", "trainer.val_every_steps=4",
          "trainer.save_every_steps=2", "trainer.log_every_steps=2",
          "trainer.val_max_sentences=8", "logger.attention_maps=false"]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_cache")


def torchrun(args: list[str], multi30k_dir: Path, cache: Path, cwd: Path,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 train.py ...`` on the CPU."""
    env = {**os.environ, "MULTI30K_DIR": str(multi30k_dir), "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(REPO / "train.py"), *args, f"data.cache_dir={cache}"]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_two_ranks_equal_one_process_with_the_same_global_batch(multi30k_dir, data_cache,
                                                                 tmp_path):
    # Rank r takes batches r, r+2, r+4, ... of the epoch: with grad_accum=2 its step s reads
    # batches 4s+r and 4s+r+2, so both ranks together read 4s..4s+3, as grad_accum=4 does.
    # Stopped after 2 steps and resumed, which must not change the result either.
    result = torchrun([*COMMON, "trainer.max_steps=2", "trainer.grad_accum=2"],
                      multi30k_dir, data_cache, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dirs = [path.parent for path in (tmp_path / "outputs").rglob(".hydra")]
    assert len(run_dirs) == 1, run_dirs  # one run directory for both ranks
    ddp_dir = run_dirs[0]
    result = torchrun([*COMMON, "trainer.max_steps=4", "trainer.grad_accum=2",
                       "trainer.resume=auto", f"hydra.run.dir={ddp_dir}"],
                      multi30k_dir, data_cache, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((ddp_dir / "tb").glob("events.*"))) == 2  # rank 0 of each launch
    output = result.stdout + result.stderr
    assert "parameters identical on all 2 ranks" in output
    assert output.count("done: step 4") == 1  # rank 0 alone logs

    single_dir = tmp_path / "single"
    train(compose_config([*COMMON, f"data.root={multi30k_dir}", f"data.cache_dir={data_cache}",
                          "trainer.max_steps=4", "trainer.grad_accum=4"]), single_dir)
    ddp = read_checkpoint(ddp_dir / "checkpoints" / "checkpoint_last.pt")
    single = read_checkpoint(single_dir / "checkpoints" / "checkpoint_last.pt")
    assert ddp["step"] == single["step"] == 4 and ddp["world_size"] == 2
    assert not any(name.startswith("module.") for name in ddp["model"])
    for name, tensor in single["model"].items():
        if name.endswith("k_proj.bias"):
            # Its gradient is zero up to rounding (softmax ignores a shift shared by all
            # keys), and Adam turns the rounding noise into full-size steps.
            continue
        torch.testing.assert_close(ddp["model"][name], tensor, rtol=1e-4, atol=1e-5,
                                   msg=name)
    # Training losses are summed over ranks; validation is split over them and summed.
    for tag in ("train/loss", "val/loss"):
        ddp_values = [value for _, value in scalar_values(ddp_dir, tag)]
        single_values = [value for _, value in scalar_values(single_dir, tag)]
        assert ddp_values == pytest.approx(single_values, rel=1e-4), tag

    # A different world size cannot resume exactly: a clear error, not a silent change.
    with pytest.raises(CheckpointError, match=r"world size \(torchrun .*\): 2 -> 1"):
        train(compose_config([*COMMON, f"data.root={multi30k_dir}",
                              f"data.cache_dir={data_cache}", "trainer.max_steps=6",
                              f"trainer.resume={ddp_dir}"]), tmp_path / "resumed")


def test_a_dead_rank_ends_the_job_and_keeps_the_last_checkpoint(multi30k_dir, data_cache,
                                                                 tmp_path):
    start = time.monotonic()
    result = torchrun([*COMMON, "trainer.max_steps=8", "trainer.dist_timeout_s=30",
                       f"hydra.run.dir={tmp_path / 'run'}"], multi30k_dir, data_cache, tmp_path,
                      env={"TRANSFORMER_FAULT_RANK": "1", "TRANSFORMER_FAULT_STEP": "3"})
    assert result.returncode != 0
    assert time.monotonic() - start < 60, "the surviving rank hung"
    assert "rank 1 exits at step 3" in result.stdout + result.stderr
    checkpoint = read_checkpoint(tmp_path / "run" / "checkpoints" / "checkpoint_last.pt")
    assert checkpoint["step"] == 2


def test_ddp_does_not_broadcast_the_constant_buffers(tmp_path):
    """DDP sends rank 0's buffers to all ranks before each forward unless told not to; the
    model's only buffers are the sinusoid tables, constant and built alike on every rank."""
    model = Transformer(31, 31, d_model=16, n_heads=2, n_encoder_layers=1, n_decoder_layers=1,
                        d_ff=32)
    assert {name for name, _ in model.named_buffers()} == {
        "encoder.embedding.positions.table", "decoder.embedding.positions.table"}
    # A one-process gloo group stands in for torchrun's; the Distributed says two ranks so
    # that wrap_for_training builds the DDP module.
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        module = wrap_for_training(model, batch_loss, 0.1, Distributed(rank=0, world_size=2))
        assert isinstance(module, DistributedDataParallel)
        assert module.broadcast_buffers is False
    finally:
        dist.destroy_process_group()


def test_run_stamp_is_shared_by_the_ranks_of_a_torchrun_job(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "1234")
    assert run_stamp() == "torchrun/1234"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # the agent's start time instead
    first = run_stamp()
    time.sleep(1.1)
    assert run_stamp() == first and re.fullmatch(r"\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d", first)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d", run_stamp())
