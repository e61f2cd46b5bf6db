"""Mixed precision in one place: the autocast context and the GradScaler.

bf16 needs no loss scaling; fp16 gets a GradScaler (whose state is checkpointed); fp32
runs without autocast. ``auto`` means bf16 on a GPU and fp32 on the CPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from transformer.config import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass
class Precision:
    name: str  # bf16 | fp16 | fp32
    device: torch.device

    @classmethod
    def resolve(cls, name: str, device: torch.device) -> Precision:
        if name == "auto":
            name = "bf16" if device.type == "cuda" else "fp32"
        if name not in DTYPES:
            raise ConfigError(f"precision={name!r} is not one of {['auto', *DTYPES]}")
        return cls(name, device)

    @property
    def dtype(self) -> torch.dtype | None:
        return DTYPES[self.name]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Enabled only for fp16; a disabled scaler passes everything through."""
        return torch.amp.GradScaler(self.device.type, enabled=self.name == "fp16")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is available "
                           "(use trainer.device=auto or cpu)")
    return torch.device(name)
