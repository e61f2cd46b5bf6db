"""A checkpoint's model as files to share, read without pickle (``scripts/export.py``).

An exported folder holds::

    model.safetensors   the model's weights; tied weights (shared embeddings, section 3.4)
                        are stored once, the other names listed in the file's metadata
    config.json         {"format": "transformer-export", "format_version", "step",
                         "vocab_size": {"src", "tgt"},
                         "tokenizer": {"kind": "bpe" | "marian", "src": FILE, "tgt": FILE},
                         "config": the resolved training config}
    tokenizer.json      one vocabulary for both sides: for "bpe" a Hugging Face
                        ``tokenizers`` file (``tokenizers.Tokenizer.from_file`` reads it)
    tokenizer_src.json  separate vocabularies instead: one such file a side
    tokenizer_tgt.json

``read_checkpoint``, ``load_checkpoint``, ``evaluate.py checkpoint=`` and
``trainer.init_from`` take the folder as a checkpoint that holds weights only.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from torch import Tensor

from transformer.checkpoint import FORMAT_VERSION, CheckpointError

EXPORT_FORMAT = "transformer-export"
EXPORT_VERSION = 1
WEIGHTS, CONFIG = "model.safetensors", "config.json"


def is_export(path: Path) -> bool:
    """Whether ``path`` is a folder that ``read_export`` should read (complete or not)."""
    return path.is_dir() and ((path / CONFIG).is_file() or (path / WEIGHTS).is_file())


def write_export(state: dict[str, Any], out_dir: Path) -> Path:
    """Write ``state`` (a checkpoint's, or ``average_checkpoints``') as an exported folder.
    The files go to a hidden folder beside ``out_dir``, renamed to it once all are written:
    a failure never leaves a folder under the real name. ``out_dir`` may exist if empty."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise CheckpointError(f"{out_dir} exists and is not an empty folder: choose another "
                              "or remove it")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_weights(state["model"], tmp / WEIGHTS)
        meta = {"format": EXPORT_FORMAT, "format_version": EXPORT_VERSION,
                "step": state["step"], "vocab_size": state["vocab_size"],
                "tokenizer": write_tokenizers(state["tokenizer"], tmp),
                "config": state["config"]}
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        shutil.copymode(tmp / CONFIG, tmp / WEIGHTS)  # safetensors writes it owner-only
        os.replace(tmp, out_dir)  # replaces an empty folder too
    except OSError as error:
        raise CheckpointError(f"could not write {out_dir}: {error.strerror or error}"
                              ) from error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after the rename
    return out_dir


def write_weights(weights: dict[str, Tensor], path: Path) -> None:
    """safetensors refuses two names over one storage: each tensor shared by several names
    is stored under its first, and ``{other name: stored name}`` kept as metadata."""
    from safetensors.torch import save_file

    stored, tied, first = {}, {}, {}
    for name, tensor in weights.items():
        view = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if tensor.numel() and view in first:
            tied[name] = first[view]
        else:
            first[view] = name
            stored[name] = tensor.detach().contiguous()
    save_file(stored, str(path), metadata={"format": "pt", "tied": json.dumps(tied)})


def write_tokenizers(entry: dict[str, Any], directory: Path) -> dict[str, str]:
    """The checkpoint's tokenizer entry (``tokenizer_entry``) as files; -> what config.json
    says of them."""
    kind = entry.get("kind", "bpe")
    if entry["tgt"] is None:
        files = {"tokenizer.json": entry["src"]}
        described = {"kind": kind, "src": "tokenizer.json", "tgt": "tokenizer.json"}
    else:
        files = {"tokenizer_src.json": entry["src"], "tokenizer_tgt.json": entry["tgt"]}
        described = {"kind": kind, "src": "tokenizer_src.json", "tgt": "tokenizer_tgt.json"}
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    return described


def read_export(directory: Path) -> dict[str, Any]:
    """An exported folder as a checkpoint state (weights only: no optimizer); a
    CheckpointError naming the file that is missing, corrupt or not of an export."""
    directory = Path(directory)
    config_path = directory / CONFIG
    meta = read_json(config_path)
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{config_path} is not the config.json of a scripts/export.py "
                              "folder (a Hugging Face Marian model? scripts/convert_marian.py "
                              "converts those)")
    if meta.get("format_version", 0) > EXPORT_VERSION:
        raise CheckpointError(f"{config_path} has format {meta['format_version']}; this code "
                              f"reads up to {EXPORT_VERSION}: update the code")
    missing = [key for key in ("step", "vocab_size", "tokenizer", "config") if key not in meta]
    if missing:
        raise CheckpointError(f"{config_path} lacks {', '.join(missing)}")
    return {"format_version": FORMAT_VERSION, "model": read_weights(directory / WEIGHTS),
            "config": meta["config"], "step": meta["step"], "vocab_size": meta["vocab_size"],
            "tokenizer": read_tokenizers(directory, meta["tokenizer"], config_path)}


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found: not a complete exported folder") from None
    except (OSError, ValueError) as error:  # ValueError: bad JSON or UTF-8
        raise CheckpointError(f"{path} is not readable JSON: {error}") from None


def read_weights(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"{path} not found: not a complete exported folder")
    try:
        with safe_open(str(path), framework="pt") as f:
            weights = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
            tied = json.loads((f.metadata() or {}).get("tied", "{}"))
        for name, stored in tied.items():
            weights[name] = weights[stored]  # the same tensor again, as the model ties them
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path} is truncated or corrupt ({error})") from None
    return weights


def read_tokenizers(directory: Path, described: Any, config_path: Path) -> dict[str, Any]:
    """The checkpoint's tokenizer entry back from the files config.json names."""
    try:
        kind, src_name, tgt_name = described["kind"], described["src"], described["tgt"]
    except (KeyError, TypeError):
        raise CheckpointError(f"{config_path}: 'tokenizer' needs kind, src and tgt") from None
    if kind not in ("bpe", "marian"):
        raise CheckpointError(f"{config_path}: tokenizer kind {kind!r} is not one of "
                              "['bpe', 'marian']")
    texts = {}
    for name in {src_name, tgt_name}:
        if not isinstance(name, str) or Path(name).name != name:  # no path out of the folder
            raise CheckpointError(f"{config_path}: tokenizer file {name!r} is not a file name")
        try:
            texts[name] = (directory / name).read_text(encoding="utf-8")
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{directory / name} is not readable: {error}") from None
    entry = {"src": texts[src_name], "tgt": None if tgt_name == src_name else texts[tgt_name]}
    return {"kind": "marian", **entry} if kind == "marian" else entry
