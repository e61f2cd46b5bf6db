"""Checkpoints: written atomically, read with clear errors, enough on their own to resume
training or to translate (weights, optimizer, schedule, RNG, resolved config, tokenizer).

Layout of a run directory (``outputs/<date>/<time>/``)::

    checkpoints/checkpoint_last.pt    the newest state, rewritten at every save
    checkpoints/checkpoint_best.pt    the best by val/bleu (or val/loss)
    checkpoints/checkpoint_<step>.pt  the last ``trainer.keep_last`` saves

Reading never runs code from a file: ``torch.load(weights_only=True)`` builds tensors and
plain data (dicts, lists, strings, numbers) only. A checkpoint of format 1 also holds numpy's
RNG state, read through ``safe_load.legacy_globals()``; a file that needs anything else is
refused.
A folder written by ``scripts/export.py`` (``transformer/export.py``) reads like a
checkpoint that holds weights only.

Building the model runs code too: the config names the classes of the model's parts
(``model.attention._target_``, ...). ``load_checkpoint`` builds classes of ``transformer``
and ``torch.nn`` only, and of the modules a caller trusts by name (``trust_modules``);
a config of a checkpoint written before the parts were config groups
(``positional: sinusoidal``, ``activation: relu``) is read as the entries of those names.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch

from transformer.safe_load import (  # noqa: F401  (re-exported: the errors' home)
    CheckpointError,
    UnsafeCheckpointError,
    load_without_code,
)

FORMAT_VERSION = 2  # 2: the RNG state is plain data, so weights-only loading reads it whole
REQUIRED_KEYS = ("format_version", "model", "config", "tokenizer", "step")
STEP_FILE = re.compile(r"checkpoint_(\d+)\.pt$")
SHARDED_DIR = re.compile(r"checkpoint_(\d+)\.dcp-[0-9a-f]+$")  # transformer/fsdp.py

log = logging.getLogger(__name__)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same directory, flushed
    to disk, then renamed over the target. A crash, a kill or a full disk leaves the previous
    file intact and no half-written one under the real name (a kill can leave the temporary
    file, which no reader takes for a checkpoint and the next ``prune_checkpoints`` removes)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write_state({"format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        raise CheckpointError(f"could not write checkpoint {path}: {error.strerror or error}"
                              ) from error
    finally:
        tmp.unlink(missing_ok=True)  # gone already after the rename


def temp_path(path: Path) -> Path:
    """Where ``path`` is written before the rename: hidden, and not named ``*.pt``."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_state(state: dict[str, Any], f: BinaryIO) -> None:
    """``torch.save(state, f)``, except that a write that fails (a full disk) raises its
    OSError: torch.save would report it as "unexpected pos", a RuntimeError naming no cause."""
    recorder = WriteErrorRecorder(f)
    try:
        torch.save(state, recorder)
    except RuntimeError:
        if recorder.error is not None:
            raise recorder.error from None
        raise


class WriteErrorRecorder:
    """A binary file's ``write`` and ``flush`` that keep the OSError of a failed write."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.f.flush()


def link_checkpoint(source: Path, path: Path) -> None:
    """Make ``path`` hold the same checkpoint as ``source`` without writing it again: a hard
    link (a copy where the file system has none), put in place atomically. Removing
    ``source`` later (pruning) leaves ``path`` intact."""
    tmp = temp_path(path)
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:  # no hard links here (some network and FAT file systems)
            shutil.copyfile(source, tmp)
        os.replace(tmp, path)
    except OSError as error:
        raise CheckpointError(f"could not write checkpoint {path}: {error.strerror or error}"
                              ) from error
    finally:
        tmp.unlink(missing_ok=True)


def write_checkpoints(state: dict[str, Any], directory: Path, best: bool = False,
                      keep_last: int = 5) -> Path:
    """A training save: ``checkpoint_<step>.pt`` serialised and written once, then
    ``checkpoint_last.pt`` (and, if ``best``, ``checkpoint_best.pt``) linked to it, then all
    but the newest ``keep_last`` numbered ones removed. Returns the numbered file. Whatever
    step a kill interrupts, every ``*.pt`` file left is whole (``latest_valid_checkpoint``
    finds the newest)."""
    numbered = Path(directory) / f"checkpoint_{state['step']}.pt"
    save_checkpoint(state, numbered)
    link_checkpoint(numbered, numbered.with_name("checkpoint_last.pt"))
    if best:
        link_checkpoint(numbered, numbered.with_name("checkpoint_best.pt"))
    prune_checkpoints(directory, keep_last)
    if state.get("sharded_state"):
        prune_sharded(directory, state["sharded_state"])
    return numbered


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"
                    ) -> dict[str, Any]:
    """Load and check a checkpoint file (or an exported folder, or a run directory: its
    checkpoint_last.pt); raise CheckpointError naming it if it is missing, truncated,
    corrupt, not one of ours, or holds more than tensors and plain data."""
    path = Path(path)
    if path.is_dir():
        from transformer.export import is_export, read_export

        if is_export(path):
            return upgrade_config(read_export(path))
        path = path / "checkpoints" / "checkpoint_last.pt" if (path / "checkpoints").is_dir() \
            else path / "checkpoint_last.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = load_without_code(path, map_location)
    except CheckpointError:
        raise
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile,
            ValueError) as error:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({error})") from error
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a transformer checkpoint (missing keys)")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format {state['format_version']}; this code reads "
                              f"up to {FORMAT_VERSION}: update the code")
    if state.get("sharded_state"):  # a sharded run's (fsdp.py): its directory lies beside it
        state["sharded_state"] = str(path.parent / state["sharded_state"])
    return upgrade_config(state)


def upgrade_config(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with its config's model section in the current form (the parts as config
    entries): what every reader of a checkpoint, old or new, then sees."""
    from transformer.components import upgrade_model_config

    config = state.get("config")
    if isinstance(config, dict) and isinstance(config.get("model"), dict):
        state["config"] = {**config, "model": upgrade_model_config(config["model"])}
    return state


def step_checkpoints(directory: Path) -> list[Path]:
    """The numbered checkpoints in ``directory``, oldest first."""
    found = [p for p in Path(directory).glob("checkpoint_*.pt") if STEP_FILE.search(p.name)]
    return sorted(found, key=step_of)


def step_of(path: Path) -> int:
    """The step in a numbered checkpoint's name: 20 for ``checkpoint_20.pt``."""
    return int(STEP_FILE.search(path.name).group(1))


def prune_checkpoints(directory: Path, keep_last: int) -> None:
    """Remove all but the newest ``keep_last`` numbered checkpoints, and the temporary files
    of writes that a kill cut short (one process writes a run's checkpoints: rank 0)."""
    for old in step_checkpoints(directory)[:-keep_last]:
        old.unlink(missing_ok=True)
    for leftover in Path(directory).glob(".checkpoint_*.pt.tmp-*"):
        leftover.unlink(missing_ok=True)


def prune_sharded(directory: Path, current: str) -> None:
    """Remove the sharded states (``transformer/fsdp.py``) of steps whose numbered checkpoint
    is gone, those of the step just saved that ``current`` replaces, and the temporary
    directories of saves a kill cut short. After the new checkpoint file is on disk."""
    kept = {step_of(path) for path in step_checkpoints(directory)}
    current_step = int(SHARDED_DIR.search(current).group(1))
    for path in Path(directory).glob("checkpoint_*.dcp-*"):
        found = SHARDED_DIR.search(path.name)
        if found is None or path.name == current:
            continue
        step = int(found.group(1))
        if step not in kept or step == current_step:
            shutil.rmtree(path, ignore_errors=True)
    for leftover in Path(directory).glob(".checkpoint_*.dcp-*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


def latest_valid_checkpoint(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``directory`` that loads: checkpoint_last.pt, unless a
    numbered one is newer (a kill between writing ``checkpoint_<step>.pt`` and linking
    checkpoint_last.pt to it); if checkpoint_last.pt does not load, the numbered ones,
    newest first. Says which ones it skipped and why."""
    directory = Path(directory)
    last = readable_checkpoint(directory / "checkpoint_last.pt")
    for path in reversed(step_checkpoints(directory)):
        if last is not None and step_of(path) <= last[1]["step"]:
            break
        found = readable_checkpoint(path)
        if found is not None:
            return found
    return last


def readable_checkpoint(path: Path) -> tuple[Path, dict[str, Any]] | None:
    """``(path, state)``, or None (with a warning that says why) if it is missing or
    does not load."""
    if not path.exists():
        return None
    try:
        return path, read_checkpoint(path)
    except UnsafeCheckpointError:
        raise  # not damage but a file that is not ours: stop, do not resume around it
    except CheckpointError as error:
        log.warning("%s; trying an older checkpoint", error)
        return None


def last_checkpoints(run_dir: Path, n: int) -> list[Path]:
    """The newest ``n`` numbered checkpoints of a run directory (or its checkpoints/). A
    run that saved fewer (a short run, a small ``trainer.keep_last``) gives all it has,
    with a warning: the evaluate command a run prints last must work for any run."""
    run_dir = Path(run_dir)
    directory = run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir
    found = step_checkpoints(directory)
    if not found:
        raise CheckpointError(f"{directory} has no numbered checkpoints "
                              "(checkpoint_<step>.pt) to average")
    if len(found) < n:
        log.warning("%s has %d numbered checkpoints, fewer than the %d asked for: averaging "
                    "those %d", directory, len(found), n, len(found))
    return found[-n:]


def average_checkpoints(paths: list[Path]) -> dict[str, Any]:
    """Average the model weights of ``paths`` (paper 6.1: the last checkpoints, averaged),
    reading one checkpoint at a time. The result keeps the last checkpoint's config and
    tokenizer, and no optimizer state: it is for evaluation and fine-tuning."""
    if not paths:
        raise CheckpointError("no checkpoints to average")
    last = read_checkpoint(paths[-1])
    reference = last["model"]
    total = {name: t.double() for name, t in reference.items()}
    for path in paths[:-1]:
        weights = read_checkpoint(path)["model"]
        check_compatible(path, weights, paths[-1], reference)
        for name, tensor in weights.items():
            total[name] += tensor.double()
    averaged = {name: (t / len(paths)).to(reference[name].dtype) for name, t in total.items()}
    keep = ("config", "tokenizer", "vocab_size", "step")
    return {**{k: last[k] for k in keep if k in last}, "model": averaged,
            "averaged_from": [str(p) for p in paths]}


def check_compatible(path: Path, weights: dict, reference_path: Path, reference: dict) -> None:
    if weights.keys() != reference.keys():
        extra = sorted(weights.keys() ^ reference.keys())[:3]
        raise CheckpointError(f"{path} and {reference_path} hold different parameters "
                              f"(e.g. {extra}): not the same model")
    for name, tensor in weights.items():
        if tensor.shape != reference[name].shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, but "
                                  f"{reference_path} has {tuple(reference[name].shape)}")


def load_checkpoint(path: str | Path | dict[str, Any], device: str | torch.device = "cpu",
                    name: str = "the averaged checkpoint", trust_modules: Sequence[str] = ()):
    """``model, tokenizer, cfg = load_checkpoint(path)``: a model in eval mode on ``device``,
    the tokenizer (encodes the source, decodes the target) and the training config.
    ``path`` may also be a checkpoint already in memory (``average_checkpoints``'s), which
    error messages call ``name``. The model's parts may be classes of ``transformer`` and
    ``torch.nn``, and of the modules named in ``trust_modules`` (their code runs as they are
    imported): a CheckpointError names any other class, and one that cannot be imported."""
    from omegaconf import OmegaConf

    from transformer.config import ConfigError, TrainConfig
    from transformer.export import is_export
    from transformer.model import build_model

    if isinstance(path, dict):
        state, path = upgrade_config(path), name
    else:
        state = read_checkpoint(path)
    exported = is_export(Path(path))  # its config and sizes are in config.json: name it
    source = Path(path) / "config.json" if exported else path
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), state["config"])
    except Exception as error:  # omegaconf raises several types for an alien config
        raise CheckpointError(f"{source}: its config does not match this code: "
                              f"{one_line(error)}") from error
    vocab = state["vocab_size"]
    try:
        model = build_model(OmegaConf.to_object(cfg.model), vocab["src"], vocab["tgt"],
                            trusted=trust_modules)
        model.load_state_dict(state["model"])
    except ConfigError as error:  # a part's class not trusted, not importable, or refusing
        raise CheckpointError(f"{source}: {error}") from None
    except (RuntimeError, ValueError) as error:
        what = ("does not match the weights in model.safetensors" if exported
                else "does not match the model code")
        raise CheckpointError(f"{source} {what}: {one_line(error)}") from error
    return model.to(device).eval(), read_tokenizer(state["tokenizer"]), cfg


def one_line(error: Exception, items: int = 3) -> str:
    """An error message on one line: load_state_dict's lists one mismatch a line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines[:items + 1]) + ("; ..." if len(lines) > items + 1 else "")


def read_tokenizer(stored: dict[str, Any]):
    """The tokenizer of a checkpoint for translating: one object that encodes the source
    and decodes the target (``translate`` takes it)."""
    from transformer.tokenizer import TokenizerPair

    src, tgt = read_tokenizers(stored)
    if tgt is src or stored.get("kind") == "marian":  # Marian's source side decodes targets
        return src
    return TokenizerPair(src, tgt)


def read_tokenizers(stored: dict[str, Any]):
    """``(src, tgt)``: the tokenizers of a checkpoint's two sides, for the data path; one
    object for both when they share a vocabulary. Ours, or an imported Marian model's
    (``scripts/convert_marian.py``: SentencePiece, a model per language)."""
    from transformer.tokenizer import Tokenizer

    if stored.get("kind") == "marian":
        from transformer.marian import MarianTokenizer

        src = MarianTokenizer.from_str(stored["src"])
        return src, src.target_side()
    src = Tokenizer.from_str(stored["src"])
    return src, Tokenizer.from_str(stored["tgt"]) if stored["tgt"] else src


def tokenizer_entry(src, tgt) -> dict[str, Any]:
    """What a checkpoint stores of the tokenizers ``(src, tgt)``; ``read_tokenizers``
    reads it back."""
    if getattr(src, "kind", None) == "marian":  # both sides live in one serialized object
        return {"kind": "marian", "src": src.to_str(), "tgt": None}
    return {"src": src.to_str(), "tgt": None if tgt is src else tgt.to_str()}
