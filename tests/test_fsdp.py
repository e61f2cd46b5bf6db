"""FSDP2 (``trainer.strategy=fsdp``) on two CPU ranks with gloo: the losses and weights of
DDP, sharded checkpoints (torch.distributed.checkpoint) that resume exactly and come with
the single-file checkpoint evaluate.py reads; written crash-safely, and read without
running code from the files."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata

from tests.test_train import scalar_values
from transformer import Transformer
from transformer.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    load_checkpoint,
    prune_sharded,
    read_checkpoint,
)
from transformer.config import EvalConfig, OptimConfig
from transformer.data import Batch
from transformer.distributed import Distributed, LossModule, wrap_for_training
from transformer.evaluation import evaluate
from transformer.fsdp import (
    SafeReader,
    full_parameters,
    is_sharded,
    load_sharded,
    read_sharded,
    save_sharded,
)
from transformer.optim import build_optimizer
from transformer.precision import Precision
from transformer.trainer import batch_loss, train_step
from transformer.translation import translate_ids

REPO = Path(__file__).resolve().parents[1]
# The toy corpus (conftest), a tiny model, dropout 0 (ranks draw other masks than DDP's).
COMMON = ["debug=fast", "data=parallel_files", "data.valid_split=valid",
          "data.test_splits=[test]", "data.vocab_size=300", "data.max_tokens=256",
          "model.dropout=0", "trainer.grad_accum=2", "trainer.val_every_steps=4",
          "trainer.save_every_steps=2", "trainer.log_every_steps=2",
          "trainer.val_max_sentences=8", "logger.attention_maps=false"]


def torchrun(args: list[str], corpus: Path, cache: Path, cwd: Path
             ) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 train.py ...`` on the CPU (gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(REPO / "train.py"), *COMMON, *args,
               f"data.root={corpus}", f"data.cache_dir={cache}"]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_fsdp_trains_like_ddp_resumes_exactly_and_gives_evaluate_its_file(corpus, cache,
                                                                          tmp_path):
    resumed, whole, ddp = tmp_path / "resumed", tmp_path / "whole", tmp_path / "ddp"
    torchrun(["trainer.strategy=fsdp", "trainer.max_steps=2", f"hydra.run.dir={resumed}"],
             corpus, cache, tmp_path)
    sharded = list((resumed / "checkpoints").glob("checkpoint_2.dcp-*"))
    assert len(sharded) == 1  # one file of shards per rank, and the index
    assert {p.name for p in sharded[0].iterdir()} == {".metadata", "__0_0.distcp",
                                                       "__1_0.distcp"}
    result = torchrun(["trainer.strategy=fsdp", "trainer.max_steps=4", "trainer.resume=auto",
                       f"hydra.run.dir={resumed}"], corpus, cache, tmp_path)
    assert "resumed at step 2" in result.stdout + result.stderr
    # The uninterrupted run also recomputes its layers in the backward (activation
    # checkpointing), which must not change a bit either (dropout is off).
    torchrun(["trainer.strategy=fsdp", "trainer.max_steps=4",
              "trainer.activation_checkpointing=true", f"hydra.run.dir={whole}"],
             corpus, cache, tmp_path)
    torchrun(["trainer.max_steps=4", f"hydra.run.dir={ddp}"], corpus, cache, tmp_path)

    last = {run: read_checkpoint(run / "checkpoints" / "checkpoint_last.pt")
            for run in (resumed, whole, ddp)}
    # Stopped and resumed through the sharded state: the uninterrupted run, bit for bit
    # (same ranks, shapes and threads).
    assert last[whole]["config"]["trainer"]["activation_checkpointing"]
    for name, tensor in last[whole]["model"].items():
        assert torch.equal(last[resumed]["model"][name], tensor), name
    for tag in ("train/loss", "val/loss"):
        assert scalar_values(resumed, tag) == scalar_values(whole, tag), tag
    # Against DDP: the same model within float tolerance (other sums: reduce-scatter,
    # sharded clipping norm), under the same names, plain tensors, full shapes.
    assert last[whole]["model"].keys() == last[ddp]["model"].keys()
    for name, tensor in last[ddp]["model"].items():
        assert type(last[whole]["model"][name]) is torch.Tensor
        if name.endswith("k_proj.bias"):
            # Its gradient is zero up to rounding (softmax ignores a shift shared by all
            # keys), and Adam turns the rounding noise into full-size steps.
            continue
        torch.testing.assert_close(last[whole]["model"][name], tensor, rtol=1e-4, atol=1e-5,
                                   msg=name)
    for tag in ("train/loss", "val/loss"):
        fsdp_values = [value for _, value in scalar_values(whole, tag)]
        ddp_values = [value for _, value in scalar_values(ddp, tag)]
        assert fsdp_values == pytest.approx(ddp_values, rel=1e-4), tag
    # The consolidated file is an ordinary checkpoint: evaluate.py's loader and translator.
    best = whole / "checkpoints" / "checkpoint_best.pt"
    model, _, cfg = load_checkpoint(best)
    assert cfg.trainer.strategy == "fsdp" and not is_sharded(model)
    out = io.StringIO()
    evaluate(EvalConfig(checkpoint=str(best), mode="interactive", device="cpu", beam=2),
             stdin=io.StringIO("a dog runs.\ntwo children play.\n"), stdout=out)
    assert len(out.getvalue().splitlines()) == 2


@pytest.fixture
def one_rank(tmp_path):
    """A one-process gloo group (FSDP2 and DCP's collectives need a group; with one rank
    each holds all of every parameter, as DTensors all the same)."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    yield Distributed(rank=0, world_size=2)  # two: so that wrap_for_training shards
    dist.destroy_process_group()


def sharded_model(ddp: Distributed) -> tuple[LossModule, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Transformer(31, 31, d_model=16, n_heads=2, n_encoder_layers=1,
                        n_decoder_layers=1, d_ff=32, dropout=0.0)
    module = wrap_for_training(model, batch_loss, 0.1, ddp, strategy="fsdp")
    return module, torch.optim.AdamW(model.parameters(), lr=1e-2)


def test_a_kill_during_the_sharded_save_leaves_no_directory_under_a_real_name(
        one_rank, tmp_path, monkeypatch):
    module, optimizer = sharded_model(one_rank)
    assert is_sharded(module.model)
    directory = tmp_path / "checkpoints"
    entries = save_sharded(module.model, optimizer, directory, 2, one_rank)
    assert entries["optimizer"] is None and not is_sharded_state(entries["model"])
    first = directory / entries["sharded_state"]

    def fail_after_the_shards(self, metadata, results):  # the disk fills before the index
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("torch.distributed.checkpoint.filesystem._FileSystemWriter.finish",
                        fail_after_the_shards)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_sharded(module.model, optimizer, directory, 4, one_rank)
    assert [p.name for p in directory.glob("checkpoint_4*")] == []  # only a .tmp
    leftovers = list(directory.glob(".checkpoint_4.dcp-*.tmp"))
    assert len(leftovers) == 1 and any(leftovers[0].glob("*.distcp"))
    # The next save's pruning removes it; the sharded state of step 2 stays readable.
    (directory / "checkpoint_2.pt").touch()
    prune_sharded(directory, first.name)
    assert set(directory.iterdir()) == {first, directory / "checkpoint_2.pt"}
    assert load_sharded(module.model, optimizer, {"sharded_state": str(first)})


def is_sharded_state(state: dict) -> bool:
    return any(type(tensor) is not torch.Tensor for tensor in state.values())


def test_an_ordinary_checkpoint_does_not_resume_a_sharded_model(one_rank, tmp_path):
    module, optimizer = sharded_model(one_rank)
    with pytest.raises(CheckpointError, match="trainer.strategy=ddp"):
        load_sharded(module.model, optimizer, {"model": {}, "optimizer": {}})
    with pytest.raises(CheckpointError, match="missing or incomplete"):
        load_sharded(module.model, optimizer, {"sharded_state": str(tmp_path / "gone")})


def test_pruning_keeps_the_sharded_states_of_the_kept_checkpoints(tmp_path):
    for name in ("checkpoint_2.dcp-aa", "checkpoint_4.dcp-bb", "checkpoint_6.dcp-cc",
                 "checkpoint_6.dcp-dd", ".checkpoint_8.dcp-ee.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / ".metadata").touch()
    for step in (4, 6):  # checkpoint_2.pt pruned by keep_last; 6 saved again (resumed run)
        (tmp_path / f"checkpoint_{step}.pt").touch()
    prune_sharded(tmp_path, "checkpoint_6.dcp-dd")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint_4.dcp-bb", "checkpoint_4.pt", "checkpoint_6.dcp-dd", "checkpoint_6.pt"]


class Marker:
    """Stands for any class a crafted file could name."""


def test_the_sharded_index_is_read_without_running_code(tmp_path):
    """DCP's index (.metadata) is a pickle, and torch's reader unpickles it unrestricted:
    a crafted one runs what it names. Ours refuses, before building anything."""
    marker = tmp_path / "ran"

    class Crafted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    crafted = tmp_path / "crafted"
    crafted.mkdir()
    (crafted / ".metadata").write_bytes(pickle.dumps(Crafted()))
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os)\.system"):
        SafeReader(crafted).read_metadata()
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os)\.system"):
        read_sharded({}, crafted, no_dist=True)
    assert not marker.exists()
    with contextlib.suppress(AttributeError):  # os.system's exit status is no Metadata
        FileSystemReader(crafted).read_metadata()  # torch's reader: the command runs
    assert marker.exists()


def test_sharded_values_are_read_as_plain_data(tmp_path):
    """A real DCP save (one process, no group) reads back through ours; a value that is
    not plain data (torch's planner would unpickle it with weights_only=False) is refused."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    dcp.save(state, checkpoint_id=tmp_path / "plain", no_dist=True)
    assert isinstance(SafeReader(tmp_path / "plain").read_metadata(), Metadata)
    target = {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()},
              "optimizer": torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(),
                                             lr=0.1).state_dict()}
    read_sharded(target, tmp_path / "plain", no_dist=True)
    torch.testing.assert_close(target["model"], state["model"], rtol=0, atol=0)
    assert target["optimizer"]["param_groups"][0]["lr"] == 0.5

    dcp.save({"value": Marker()}, checkpoint_id=tmp_path / "object", no_dist=True)
    with pytest.raises(UnsafeCheckpointError, match="value"):
        read_sharded({"value": None}, tmp_path / "object", no_dist=True)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
def test_fsdp_on_cuda_with_nccl_trains_saves_and_decodes(tmp_path):
    """One NCCL rank (the lent GPU machine has one GPU): the project's step (fused AdamW,
    bf16 autocast) on the sharded model equals the plain model's, the sharded state
    round-trips, and validation's decoding runs on the gathered weights."""
    device = torch.device("cuda")
    precision = Precision.resolve("bf16", device)
    torch.manual_seed(0)
    tokens = torch.randint(3, 31, (8, 8), device=device)
    batch = Batch(tokens[:, 1:], tokens[:, :-1], tokens[:, 1:], list(range(8)), 56, 56)
    plain, sharded = (Transformer(31, 31, d_model=32, n_heads=4, n_encoder_layers=2,
                                  n_decoder_layers=2, d_ff=64, dropout=0.0).to(device)
                      for _ in range(2))
    sharded.load_state_dict(plain.state_dict())

    def steps(module, optimizer, n: int) -> torch.Tensor:
        return torch.stack([train_step(module, [batch], optimizer, precision.grad_scaler(),
                                       precision, 1.0, 0.1).loss_sum for _ in range(n)])

    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        ddp = Distributed(rank=0, world_size=2)  # two: so that wrap_for_training shards
        module = wrap_for_training(sharded, batch_loss, 0.1, ddp, "fsdp")
        assert is_sharded(sharded)
        plain_optimizer, optimizer = (build_optimizer(m, OptimConfig(lr=1e-3), device)
                                      for m in (plain, sharded))
        torch.testing.assert_close(steps(module, optimizer, 3), steps(plain, plain_optimizer, 3),
                                   rtol=1e-3, atol=1e-3)
        entries = save_sharded(sharded, optimizer, tmp_path, 3, ddp)
        after = steps(module, optimizer, 1)
        load_sharded(sharded, optimizer, {"sharded_state": str(tmp_path /
                                                               entries["sharded_state"])})
        torch.testing.assert_close(steps(module, optimizer, 1), after, rtol=0, atol=0)
        with full_parameters(module), torch.inference_mode():
            sharded.eval()
            assert len(translate_ids(sharded, [[5, 6, 7, 2]], beam=2, max_tokens=64)) == 1
    finally:
        dist.destroy_process_group()
