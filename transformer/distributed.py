"""Data-parallel training across processes: ``torchrun --nproc_per_node=N train.py ...``.

torchrun starts one process per GPU (or CPU worker) and tells each its place through the
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); without them training runs as one
process and every function here is a no-op. Each rank trains on its own shard of the
batches; DistributedDataParallel averages the gradients, and only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import inspect
import itertools
import logging
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger("transformer")


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job; ``Distributed()`` is a single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # A gloo group beside NCCL's, for small decisions taken on the host (``any_rank``);
    # None: the default group (gloo already, on the CPU).
    cpu_group: Any = field(default=None, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, TensorBoard events and log lines."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE_PROCESS = Distributed()


def init_distributed(device: torch.device, timeout_s: float) -> tuple[Distributed,
                                                                       torch.device]:
    """Join the process group torchrun describes in the environment (NCCL on GPU, gloo on
    CPU) and return this rank's place and device (``cuda:LOCAL_RANK`` on GPU). ``timeout_s``
    bounds every collective, so a rank that waits for a dead peer fails instead of hanging."""
    export_submitit_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_s))
    cpu_group = None
    if dist.get_backend() != "gloo":  # every rank makes the group, in the same order
        cpu_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    if rank != 0:  # one copy of each log line, from rank 0; warnings and errors from all
        logging.getLogger("transformer").setLevel(logging.WARNING)
    return Distributed(rank, world_size, local_rank, cpu_group), device


def launch_rank() -> int:
    """This process's rank as torchrun (or submitit) set it, before any process group."""
    export_submitit_env()
    return int(os.environ.get("RANK", "0"))


def export_submitit_env() -> None:
    """Under hydra-submitit-launcher (configs/hydra/launcher/slurm.yaml) SLURM
    starts one task per rank without torchrun: export their places as torchrun would."""
    several_tasks = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if "RANK" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ or not several_tasks:
        return
    from submitit.helpers import TorchDistributedEnvironment  # installed with the plugin

    TorchDistributedEnvironment().export()


def shutdown() -> None:
    """Destroy the process group, after the modules that use it (drop them first).

    A DDP reducer freed after ``destroy_process_group`` is left holding the last reference
    to gloo's group, whose destructor then joins gloo's threads with the GIL held, while a
    thread still frees an all-gather's Python tensors and waits for the GIL: the process
    hangs at exit (seen with torch 2.13, now and then). Freed here first (``gc.collect``:
    DDP sits in reference cycles), the group's own destructor runs last, without the GIL."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def barrier(ddp: Distributed) -> None:
    if ddp.enabled:
        dist.barrier()


@contextlib.contextmanager
def main_first(ddp: Distributed) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. tokenising and caching the data), then the others
    run it and find the work done: no rank repeats a slow preparation."""
    if not ddp.is_main:
        barrier(ddp)
    yield
    if ddp.is_main:
        barrier(ddp)


def sum_over_ranks(tensor: Tensor, ddp: Distributed) -> Tensor:
    """The element-wise sum of ``tensor`` over all ranks (the tensor itself in one process)."""
    if ddp.enabled:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, ddp: Distributed) -> bool:
    """True on every rank if ``flag`` is True on any (a decision all ranks must take
    together, such as stopping). An all-reduce (MAX) of one int on the CPU: it waits for the
    other ranks' CPUs, never for a GPU."""
    if not ddp.enabled:
        return flag
    flags = torch.tensor([int(flag)])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=ddp.cpu_group)
    return bool(flags.item())


def gather(value: Any, ddp: Distributed) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not ddp.enabled:
        return [value]
    values: list[Any] = [None] * ddp.world_size
    dist.all_gather_object(values, value)
    return values


class LossModule(nn.Module):
    """``loss_fn(model, batch, label_smoothing)`` as a module's forward: DDP synchronises
    gradients only for what runs through ``forward``, and the loss calls ``model.encode``
    and ``model.decode_states`` rather than ``model(...)``."""

    def __init__(self, model: nn.Module, loss_fn, label_smoothing: float):
        super().__init__()
        self.model, self.loss_fn, self.label_smoothing = model, loss_fn, label_smoothing

    def forward(self, batch) -> tuple[Tensor, Tensor]:
        return self.loss_fn(self.model, batch, self.label_smoothing)


def wrap_for_training(model: nn.Module, loss_fn, label_smoothing: float, ddp: Distributed,
                      strategy: str = "ddp") -> nn.Module:
    """The module the training step calls: ``(loss sum, nll sum) = module(batch)``. With
    several ranks, ``strategy`` ddp wraps it in DistributedDataParallel; fsdp shards the
    model's parameters over the ranks in place (``transformer/fsdp.py``): build the
    optimizer after this. Validation, decoding and checkpoints keep using the bare
    ``model`` (its state_dict has no ``module.`` prefix)."""
    module = LossModule(model, loss_fn, label_smoothing)
    if not ddp.enabled:
        if strategy == "fsdp":
            log.info("trainer.strategy=fsdp: one process, nothing to shard")
        return module
    if strategy == "fsdp":
        from transformer.fsdp import shard

        return shard(module, next(model.parameters()).device)
    # device_ids=None: batches are already on this rank's device, so DDP need not move them.
    # No buffer sync before each forward: the only buffers are the sinusoid tables, constant
    # and the same on every rank; DDP would otherwise send rank 0's every time.
    return DistributedDataParallel(module, **{NO_BUFFER_SYNC: False})


# broadcast_buffers was renamed forward_sync_buffers (torch 2.13), with a warning for the old name.
NO_BUFFER_SYNC = ("forward_sync_buffers" if "forward_sync_buffers" in
                  inspect.signature(DistributedDataParallel.__init__).parameters
                  else "broadcast_buffers")


def gradient_sync(module: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """``module.no_sync()`` on the micro-batches before the last of a step: gradients
    accumulate locally and are all-reduced once, in the last backward. FSDP reduce-scatters
    in every backward: skipping it would keep each rank's whole unsharded gradient."""
    if sync or not isinstance(module, DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()


def parameter_checksum(model: nn.Module) -> str:
    """A short hash of all parameter bytes: equal on every rank while DDP keeps them in step.
    Sharded parameters (FSDP) are gathered whole first, on every rank in the same order."""
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_in_step(model: nn.Module, ddp: Distributed) -> str:
    """Compare the parameters of all ranks at the end of a run; raise if they drifted apart
    (a bug: every rank must apply the same averaged gradients)."""
    checksums = gather(parameter_checksum(model), ddp)
    if len(set(checksums)) != 1:
        raise RuntimeError(f"the ranks' parameters differ at the end of training: {checksums}")
    return checksums[0]


def maybe_inject_fault(rank: int, step: int) -> None:
    """Tests only: ``TRANSFORMER_FAULT_RANK=r TRANSFORMER_FAULT_STEP=s`` make rank r fail as
    it starts step s, in the first attempt of the job (torchrun's restarts resume past it):
    it exits, as a crashed GPU or node would, or with ``TRANSFORMER_FAULT_KIND=stop`` it
    stops (SIGSTOP), as a hung one would; the tests check that the job ends, not hangs."""
    fault_rank, fault_step = (os.environ.get(f"TRANSFORMER_FAULT_{key}") for key in
                              ("RANK", "STEP"))
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if fault_rank is None or int(fault_rank) != rank or int(fault_step) != step \
            or not first_attempt:
        return
    if os.environ.get("TRANSFORMER_FAULT_KIND") == "stop":
        log.error("TRANSFORMER_FAULT_*: rank %d stops at step %d", rank, step)
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    log.error("TRANSFORMER_FAULT_*: rank %d exits at step %d", rank, step)
    os._exit(1)


# What gloo and NCCL say when a peer is gone (its process or node died: the connection
# drops) or hangs (a collective waits past trainer.dist_timeout_s).
PEER_LOST = re.compile(r"Connection (reset|closed) by peer|Broken pipe|Timed out waiting|"
                       r"timed out|Watchdog caught collective operation timeout|"
                       r"NCCL communicator was aborted", re.IGNORECASE)


def peer_lost(error: BaseException) -> str | None:
    """One line for an error of a collective whose peer died or hangs, else None.

    The rank that sees it did nothing wrong: it says what gloo or NCCL reported, without
    the trace of the collective it was in, and how to go on. Checkpoints are written
    through a temporary file, so the newest one on disk is whole."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or not isinstance(error, RuntimeError):
        return None
    text = str(error).strip()
    match = PEER_LOST.search(text)
    if not match:
        return None
    line = next((line for line in text.splitlines() if PEER_LOST.search(line)), match[0])
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", line.strip())  # gloo's source line
    line = line.split(". This is typically caused", 1)[0]
    return (f"rank {os.environ.get('RANK', '?')} lost another rank of the job ({line}): a "
            "process or node died or hangs (see its log). Restart the job with "
            "trainer.resume=auto: it continues from the newest checkpoint")


def run_stamp(root: str | None = None) -> str:
    """The run directory's name under ``root`` (outputs/), identical in every rank of a
    torchrun job (Hydra resolves ``${now:...}`` in each process, so ranks started a second
    apart would each make their own directory):

    - not under torchrun: ``<date>/<time>`` now, as Hydra's default; given ``root``, a
      folder of that name is made there at once, and if another run made it first (two
      runs launched in the same second), ``<time>-1``, ``<time>-2``, ... (``reserve_stamp``);
    - under torchrun with a run id (``--standalone`` draws one; ``--rdzv-id=$SLURM_JOB_ID``
      keeps it across a requeue): ``torchrun/<run id>``;
    - under torchrun without one (``none``): ``<date>/<time>`` of the torchrun agent's start,
      the same for all ranks of one node (on several nodes, pass ``--rdzv-id``). Two such
      jobs started in the same second share it; the run directory's lock then stops the
      second (``transformer/run_lock.py``).
    """
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return f"torchrun/{run_id}"
    started = agent_start_time() if run_id else None
    stamp = time.strftime("%Y-%m-%d/%H-%M-%S", time.localtime(started))
    if root is None or run_id:  # the ranks of a job must agree: none reserves on its own
        return stamp
    if root not in _RESERVED:  # one run directory per process, however often resolved
        _RESERVED[root] = reserve_stamp(Path(root), stamp)
    return _RESERVED[root]


_RESERVED: dict[str, str] = {}


def reserve_stamp(root: Path, stamp: str) -> str:
    """``stamp``, or else ``stamp-1``, ``stamp-2``, ...: the first whose folder under ``root``
    this call creates. ``mkdir`` fails if the folder exists, atomically, so two processes
    never get the same one. Where ``root`` cannot be written, ``stamp`` (Hydra then fails
    to make the folder and says why)."""
    try:
        (root / stamp).parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return stamp
    for name in itertools.chain([stamp], (f"{stamp}-{n}" for n in itertools.count(1))):
        try:
            (root / name).mkdir()
            return name
        except FileExistsError:
            continue
        except OSError:
            return stamp


def agent_start_time() -> float | None:
    """When the parent process (torchrun's agent) started, from /proc (Linux); else None.
    Boot time plus start ticks: exact integers, so every child computes the same value."""
    try:
        stat = Path(f"/proc/{os.getppid()}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, IndexError, ValueError, StopIteration):
        return None
    return boot + ticks // os.sysconf("SC_CLK_TCK")


def register_run_stamp_resolver() -> None:
    """``${run_stamp:outputs}`` in configs/train.yaml's hydra.run.dir."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True)
