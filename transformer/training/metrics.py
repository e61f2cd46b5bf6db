"""What the loop logs: summed step outputs (loss, tokens/s, MFU), the progress bar, and
the HParams name and values of a run."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from transformer.data import collate
from transformer.distributed import LossModule, gradient_sync
from transformer.training.step import StepOutput, batch_loss

if TYPE_CHECKING:
    from transformer.training.run import Run

log = logging.getLogger("transformer")

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12}  # bf16 dense


class Meter:
    """Sums the applied steps' outputs on the device; one host sync per logging interval
    (skipped steps stay out: their loss is nan or inf). The sums go into
    checkpoints: a run resumed between two log lines logs the same averages as one that went
    on (float(x) of a float32 sum, added to the next float32 value, gives the same bits)."""

    SUMS = ("loss", "nll", "grad_norm", "tokens", "steps")

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss = self.nll = self.grad_norm = 0.0
        self.tokens = self.steps = 0
        self.start = time.perf_counter()

    def state_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in self.SUMS}

    def load_state_dict(self, sums: dict[str, float]) -> None:
        for name in self.SUMS:
            setattr(self, name, sums[name])

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (validation, saving) does not count towards tokens/s."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - start

    def add(self, output: StepOutput) -> None:
        self.loss = self.loss + output.loss_sum
        self.nll = self.nll + output.nll_sum
        self.grad_norm = self.grad_norm + output.grad_norm
        self.tokens = self.tokens + output.n_tokens
        self.steps += 1

    def summary(self, run: Run) -> dict[str, float]:
        seconds = time.perf_counter() - self.start
        tokens = max(int(self.tokens), 1)
        nll = float(self.nll) / tokens
        metrics = {
            "train/loss": float(self.loss) / tokens,
            "train/nll_loss": nll,
            "train/ppl": math.exp(min(nll, 50.0)),
            "train/lr": run.optimizer.param_groups[0]["lr"],
            "train/grad_norm": float(self.grad_norm) / max(self.steps, 1),
            "train/tokens_per_s": tokens / seconds,  # of all ranks together
        }
        peak = peak_flops(run.device)
        if run.flops_per_token and peak:
            metrics["train/mfu"] = metrics["train/tokens_per_s"] * run.flops_per_token / peak
        if run.scaler.is_enabled():
            metrics["train/loss_scale"] = run.scaler.get_scale()
        self.reset()
        return metrics


class Progress:
    """A tqdm bar on a terminal; plain log lines otherwise (log files, SLURM)."""

    def __init__(self, total: int, initial: int, enabled: bool = True):
        self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, leave=False) \
            if enabled and sys.stderr.isatty() else None

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def show(self, step: int, metrics: dict[str, float]) -> None:
        short = {"loss": f"{metrics['train/loss']:.3f}", "lr": f"{metrics['train/lr']:.2e}",
                 "tok/s": f"{metrics['train/tokens_per_s']:.0f}"}
        if self.bar is not None:
            self.bar.set_postfix(short)
        else:
            log.info("step %d | %s", step, " | ".join(f"{k} {v}" for k, v in short.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """model.d_model=..., optim.lr=...: the keys a sweep varies, for the HParams table;
    the command line's overrides first."""
    flat = {}
    for override in command_line_overrides():
        key, _, _ = override.lstrip("+~").partition("=")
        try:
            value = OmegaConf.select(cfg, key)
        except Exception:  # an override of something that is not a config value
            continue
        if value is None or isinstance(value, (int, float, str, bool)):
            flat[key] = "None" if value is None else value
    for group in ("model", "optim", "sched", "data"):
        for key, value in OmegaConf.to_container(cfg[group], resolve=True).items():
            if value is None or isinstance(value, (int, float, str, bool)):
                flat[f"{group}.{key}"] = "None" if value is None else value
    for key in ("max_steps", "grad_accum", "clip_norm", "label_smoothing", "seed"):
        flat[f"trainer.{key}"] = cfg.trainer[key] if cfg.trainer[key] is not None else "None"
    return flat


def command_line_overrides() -> list[str]:
    """This job's overrides of the config (``model.n_layers=2``, a sweep's values
    included), without Hydra's own; empty outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith("hydra.")]


# Overrides that say where things are, not what the run is: left out of its HParams name.
PLACE_KEYS = ("data.root", "data.cache_dir", "trainer.resume", "trainer.reset_dataloader",
              "trainer.threads", "logger.")


def trial_name(run_dir: Path) -> str:
    """The HParams row of this run: what it changed (``model.n_layers=2,optim.lr=5e-4``),
    else its run directory."""
    changes = [o for o in command_line_overrides() if not o.lstrip("+~").startswith(PLACE_KEYS)]
    return ",".join(changes) or str(run_dir)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def measure_flops_per_token(run: Run) -> float:
    """Forward+backward FLOPs per target token, counted once before training on a batch of
    the first 32 pairs (torch.utils.flop_counter); used for train/mfu. Its dropout draws
    happen in a forked RNG, so a resumed run's random streams match an uninterrupted one."""
    from torch.utils.flop_counter import FlopCounterMode

    split = run.data.splits[run.cfg.data.train_split]
    batch = collate(split, list(range(min(32, len(split.src_ids))))).to(run.device)
    counter = FlopCounterMode(display=False)
    # Under DDP through the training module, without the gradient all-reduce (no real step).
    module = run.train_module if run.ddp.enabled else LossModule(
        run.model, batch_loss, run.cfg.trainer.label_smoothing)
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []), \
            counter, run.precision.autocast(), gradient_sync(module, sync=False):
        loss, _ = module(batch)
        loss.backward()
    run.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch.n_tgt_tokens
