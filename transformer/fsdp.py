"""Fully sharded data parallel training (FSDP2): ``trainer.strategy=fsdp`` under torchrun.

Under DDP every rank holds the whole model, its gradients and its optimizer state. Under
FSDP each rank holds 1/N of each (``torch.distributed.fsdp.fully_shard``): a layer's
parameters are all-gathered just before it runs and freed after, in the forward and again
in the backward, and its gradients are reduce-scattered, each rank keeping the gradient of
its own shard. Each encoder and decoder layer is one unit; the root (the training module)
holds the rest: embeddings, the output projection, final norms.

Checkpoints of a sharded run come in two parts, written together by ``save_sharded``:

    checkpoints/checkpoint_<step>.pt               the ordinary checkpoint: the full weights
                                                   (gathered on rank 0), config, tokenizer,
                                                   training state; evaluate.py reads it
    checkpoints/checkpoint_<step>.dcp-<id>/        model and optimizer state, one file of
                                                   shards per rank (torch.distributed.checkpoint)

The ``.pt`` names its directory (``sharded_state``), and a resume reads the weights and the
optimizer state from there (``load_sharded``). DCP stores its index (``.metadata``) and any
non-tensor value with pickle and reads them back with ``pickle.load`` and
``torch.load(weights_only=False)``, which would run code a crafted file names; here both are
read through allow-lists instead (``SafeReader``, ``SafePlanner``), as ``checkpoint.py``
reads the ``.pt`` files.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from transformer.checkpoint import CheckpointError, UnsafeCheckpointError
from transformer.distributed import Distributed, gather


def shard(module: nn.Module, device: torch.device) -> nn.Module:
    """``fully_shard`` each encoder and decoder layer of ``module.model``, then ``module``
    (the training module, whose forward runs the whole loss: the root's parameters, used by
    the loss's output projection too, are gathered once for it). Parameters become DTensors
    sharded over the ranks, in place: build the optimizer after this."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))  # all ranks, one axis
    model = module.model
    for layer in [*model.encoder.layers, *model.decoder.layers]:
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


@contextlib.contextmanager
def full_parameters(module: nn.Module | None) -> Iterator[None]:
    """Within the block every parameter of ``module`` is whole on every rank, and the
    model runs without collectives: validation and decoding, where ranks run different
    numbers of forwards (their share of the sentences, beam search stopping early), would
    otherwise wait forever for each other's all-gathers. Costs the full model's memory for
    the block, as DDP does all the time. A no-op for an unsharded module."""
    units = [m for m in module.modules() if isinstance(m, FSDPModule)] if module else []
    if not units:
        yield
        return
    root = units[0]
    root.set_reshard_after_forward(False)  # recursive: no unit frees its gathered weights
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        # Training's settings back: layers free their weights after the forward; the
        # root keeps its own (the backward needs them at once).
        root.set_reshard_after_forward(True)
        root.set_reshard_after_forward(False, recurse=False)


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path,
                 step: int, ddp: Distributed) -> dict[str, Any] | None:
    """Every rank: write the model and optimizer state, sharded, to
    ``directory/checkpoint_<step>.dcp-<id>`` (a temporary directory first, renamed by rank 0
    once every rank's files and the index are written and fsynced: a kill leaves no
    half-written directory under a real name), and gather the full weights onto rank 0's
    CPU. Returns on rank 0 what the ordinary checkpoint then holds instead of the plain
    state dicts ({} on the others); None, doing nothing, for an unsharded model.

    ``<id>`` is new at each save: a save never replaces the directory that an older
    ``checkpoint_<step>.pt`` names (a run resumed from an earlier checkpoint into its own
    directory passes the same steps again); ``write_checkpoints`` prunes the stale ones."""
    if not is_sharded(model):
        return None
    name = gather(f"checkpoint_{step}.dcp-{secrets.token_hex(4)}", ddp)[0]  # rank 0's
    final = Path(directory) / name
    tmp = final.with_name(f".{name}.tmp")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    try:
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
        if ddp.is_main:
            os.replace(tmp, final)
    except (OSError, CheckpointException) as error:
        raise CheckpointError(f"could not write sharded checkpoint {final}: "
                              f"{cause(error)}") from None
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
    if not ddp.is_main:
        return {}
    return {"model": full, "optimizer": None, "sharded_state": name}


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint: dict[str, Any]
                 ) -> bool:
    """The weights and optimizer state of a sharded checkpoint into ``model`` and
    ``optimizer`` (sharded or not: DCP reads each rank's part). False, loading nothing, for
    an ordinary checkpoint into an unsharded model; a CheckpointError for an ordinary one
    into a sharded model (its optimizer state is one rank's whole state, keyed by position:
    resume it with trainer.strategy=ddp)."""
    name = checkpoint.get("sharded_state")
    if name is None:
        if is_sharded(model):
            raise CheckpointError("the checkpoint was written by an unsharded run (no "
                                  "sharded_state): resume it with trainer.strategy=ddp")
        return False
    path = Path(name)
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"the sharded state of the checkpoint, {path}, is missing or "
                              "incomplete (removed with its numbered checkpoint?)")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = read_sharded({"model": model_state, "optimizer": optimizer_state}, path)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    return True


def read_sharded(state: dict[str, Any], path: Path, no_dist: bool = False) -> dict[str, Any]:
    """``dcp.load(state, path)`` in place, through ``SafeReader`` and ``SafePlanner``; a
    CheckpointError (UnsafeCheckpointError for code) naming the file, not DCP's report of
    every rank's traceback."""
    reader = SafeReader(path)
    reader.read_metadata()  # its refusal as it is (dcp.load would report it as a string)
    try:
        dcp.load(state, storage_reader=reader, planner=SafePlanner(), no_dist=no_dist)
    except CheckpointException as error:
        failure = cause(error)
        if isinstance(failure, CheckpointError):
            raise failure from None
        raise CheckpointError(f"could not read sharded checkpoint {path}: {failure}"
                              ) from None
    return state


def cause(error: BaseException) -> BaseException | str:
    """The first failing rank's exception inside DCP's CheckpointException (which derives
    from BaseException, not Exception); an OSError's reason."""
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    return error.strerror or error if isinstance(error, OSError) else error


# What DCP's index (.metadata) may name: its own dataclasses, torch.Size, dtypes and
# layouts, the path it was written to. Building any of them runs no code of the file's.
METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class MetadataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that builds only ``METADATA_GLOBALS`` and torch dtypes."""

    def __init__(self, file: io.BufferedReader, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if dtype or name in METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.source} is refused: its pickle needs {module}.{name}, which loading "
            "would have to import and call (code from the file); a sharded checkpoint's "
            "index may hold only torch.distributed.checkpoint's metadata")


class SafeReader(FileSystemReader):
    """DCP's file reader, with the index read through ``MetadataUnpickler`` (torch's
    reader unpickles it unrestricted). The tensors it already reads weights-only."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        rank = kwargs.get("rank")  # a rank's own index, from saves without collectives
        path = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
        try:
            with open(path, "rb") as f:
                metadata = MetadataUnpickler(f, path).load()
        except UnsafeCheckpointError:
            raise
        except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as error:
            raise CheckpointError(f"sharded checkpoint index {path} is unreadable ({error})"
                                  ) from error
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's load planner, with non-tensor values (the optimizer's learning rate, betas,
    ...) read by ``torch.load(weights_only=True)``: plain data only. torch's own planner
    passes weights_only=False."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as error:
            raise UnsafeCheckpointError(
                f"a value of the sharded checkpoint ({read_item.dest_index.fqn}) is refused: "
                f"it holds more than plain data ({str(error).splitlines()[0]})") from None
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes puts it in place
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn],
                        loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
