"""Reading a checkpoint file without running code from it: ``torch.load(weights_only=True)``
builds tensors and plain data only; a refused file is scanned statically for the globals
its pickle names, and read only if all are on the allow-list of the legacy format."""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("transformer.checkpoint")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not fit; the message names the file."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle names a function or class outside the allow-lists: loading
    it would import and call that (a pickle can run any code). Refused before anything of
    the file is built; ``trainer.resume=auto`` stops at it instead of trying an older one."""


def legacy_globals() -> dict[str, Any]:
    """What checkpoints of format 1 hold beyond torch's weights-only allow-list, by the name
    their pickle gives it: numpy's RNG state, a tuple whose key array is a uint32 ndarray
    (``np.random.get_state()``). Nothing here runs code: ``_reconstruct`` makes an empty
    array, ``dtype`` a dtype, and the array's bytes are data."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct  # numpy 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct  # numpy 1
    return {"numpy._core.multiarray._reconstruct": _reconstruct,
            "numpy.core.multiarray._reconstruct": _reconstruct,  # files written by numpy 1
            "numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype,
            # not named in the file: the class of the key array's dtype, which its state sets
            "numpy.dtypes.UInt32DType": type(np.dtype(np.uint32))}


def load_without_code(path: Path, map_location: str | torch.device) -> Any:
    """``torch.load(path, weights_only=True)``, which builds only tensors and plain data. A
    file it refuses is scanned (statically: nothing is imported or built) for the globals its
    pickle names: if all are ``legacy_globals``, it is read with those allowed and a line
    logged; otherwise it is refused with an UnsafeCheckpointError naming them."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = weights_only_reason(error)
    try:
        named = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except (ValueError, EOFError, pickle.UnpicklingError, RuntimeError):
        # Not a file torch's scanner reads (torch.save's pre-1.6 format, a damaged or
        # hand-made pickle): torch's refusal names the global it met, if any.
        named = re.findall(r"GLOBAL ([\w.]+)", reason)
    allowed = legacy_globals()
    unsafe = [name for name in named if name not in allowed]
    if unsafe:
        raise UnsafeCheckpointError(refused_message(path, unsafe))
    if not named:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({reason})")
    try:
        with torch.serialization.safe_globals([(obj, name) for name, obj in allowed.items()]):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:  # e.g. an array of another dtype than numpy's RNG's
        built = re.search(r"got <class '([^']+)'>", weights_only_reason(error))
        raise UnsafeCheckpointError(refused_message(
            path, [built.group(1) if built else weights_only_reason(error)])) from None
    log.warning("%s is in the legacy format (numpy RNG state as numpy objects), read through "
                "the allow-list of %s; the next save of a resumed run writes the current "
                "format, and scripts/export.py writes weights to share", path, ", ".join(named))
    return state


def refused_message(path: Path, offending: list[str]) -> str:
    return (f"{path} is refused: its pickle needs {', '.join(offending)}, which loading would "
            "have to import and call (code from the file); a checkpoint may hold only "
            "tensors and plain data")


def weights_only_reason(error: pickle.UnpicklingError) -> str:
    """The line of torch's (long) weights-only refusal that says what it met."""
    text = str(error).split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()
             and not line.startswith(("Weights only load failed", "Check the documentation"))]
    return lines[0].split(" Please ", 1)[0].rstrip(".") if lines else "weights-only load failed"
