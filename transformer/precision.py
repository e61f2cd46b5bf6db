"""Mixed precision in one place: the autocast context and the GradScaler.

bf16 needs no loss scaling; fp16 gets a GradScaler (whose state is checkpointed); fp32
runs without autocast. ``auto`` picks what is fastest where the run is: bf16 on a GPU;
on the CPU bf16 only where the processor multiplies bf16 matrices natively (Intel AMX,
AVX-512 BF16), since elsewhere torch emulates bf16 products and a step is ~20x slower
than in fp32 (docs/benchmarks.md); fp32 otherwise. Translation keeps fp32 on the CPU.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from transformer.config import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}

# The Multi30k recipe's step (scripts/benchmark.py --preset cpu-recipe, ours) on a 2-core
# AMD EPYC whose torch capability is AVX2: 25.7 s in bf16 against 1.28 s in fp32.
EMULATED_BF16_SLOWDOWN = "about 20x slower than fp32 (25.7 s against 1.28 s per step of " \
                         "the Multi30k recipe on a 2-core AMD EPYC, AVX2)"

log = logging.getLogger(__name__)
_warned_emulated_bf16 = False


def cpu_bf16_support() -> tuple[bool, str]:
    """``(native, why)``: whether this CPU multiplies bf16 matrices in hardware, as torch's
    kernels (oneDNN) use it, and the evidence, e.g. ``"AMX tiles"`` or ``"torch CPU
    capability AVX2, no AMX or AVX-512 BF16"``."""
    capability = torch.backends.cpu.get_cpu_capability()
    for probe, feature in (("_is_amx_tile_supported", "AMX tiles"),
                           ("_is_avx512_bf16_supported", "AVX-512 BF16")):
        check = getattr(torch.cpu, probe, None)  # private helpers of torch >= 2.1
        if check is not None and check():
            return True, f"{feature} (torch CPU capability {capability})"
    return False, f"torch CPU capability {capability}, no AMX or AVX-512 BF16"


@dataclass
class Precision:
    name: str  # bf16 | fp16 | fp32
    device: torch.device
    reason: str = "as configured"  # why this precision: logged at start-up

    @classmethod
    def resolve(cls, name: str, device: torch.device, training: bool = True) -> Precision:
        """``name`` (auto | bf16 | fp16 | fp32) for ``device``. ``auto`` is bf16 on a GPU;
        on the CPU, for training, bf16 where the CPU has bf16 matrix units, else fp32; for
        translation (``training=False``) fp32 on the CPU (exact, and decoding is not
        product-bound). An explicit bf16 on a CPU without those units warns once."""
        if name not in ("auto", *DTYPES):
            raise ConfigError(f"precision={name!r} is not one of {['auto', *DTYPES]}")
        if device.type != "cpu":
            return cls("bf16" if name == "auto" else name, device)
        native, why = cpu_bf16_support()
        if name == "auto":
            if training and native:
                return cls("bf16", device, f"auto: this CPU has bf16 matrix units ({why})")
            return cls("fp32", device, f"auto: {why}" if training else "auto: fp32 on the CPU")
        if name == "bf16" and not native:
            warn_emulated_bf16(why)
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


def warn_emulated_bf16(why: str) -> None:
    """Once per process: bf16 was asked for on a CPU that emulates it."""
    global _warned_emulated_bf16
    if not _warned_emulated_bf16:
        _warned_emulated_bf16 = True
        log.warning("precision=bf16 on a CPU without bf16 matrix units (%s): torch emulates "
                    "bf16 products here, %s; use precision=auto or fp32", why,
                    EMULATED_BF16_SLOWDOWN)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is available "
                           "(use trainer.device=auto or cpu)")
    return torch.device(name)
