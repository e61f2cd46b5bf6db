"""The command line of train.py and evaluate.py: every user error is one line, exit 2.

``@entry_point("train", TrainConfig)`` stands in for ``@hydra.main``. Hydra reports its
own errors (a misspelt key, a bad value, an unknown group option, an override it cannot
parse, a run directory it cannot create) in about seven lines with exit status 1; here
Hydra raises them instead (``HYDRA_FULL_ERROR``), and they become ``error: ...`` naming the
key, with the closest valid key for a misspelt one. Before the task runs, the composed
config is checked for what Hydra lets through: keys added with ``+key=value`` that the
typed schema does not have (Hydra stores them and nothing reads them), missing mandatory
values and broken interpolations. Relative data paths are made absolute against the
folder the command started in. ``HYDRA_FULL_ERROR=1`` set by the user keeps Hydra's
tracebacks.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import is_dataclass
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)

from transformer.checkpoint import CheckpointError
from transformer.components import PARTS
from transformer.config import ConfigError
from transformer.data import DataError
from transformer.distributed import peer_lost

# What a user can cause inside the task: the project's errors name the key, file or step;
# an OSError names the file (a folder that cannot be written, a full disk).
USER_ERRORS = (ConfigError, DataError, CheckpointError, FloatingPointError, OSError)
DATA_PATH_KEYS = ("data.root", "data_root",  # train.py's and evaluate.py's
                  "data.tokenizer", "data.src_tokenizer", "data.tgt_tokenizer",
                  "data.train_tgt_file")


def entry_point(config_name: str, schema: type) -> Callable[[Callable[[DictConfig], Any]],
                                                            Callable[[], Any]]:
    """``hydra.main`` over ``configs/<config_name>.yaml`` (beside the decorated function's
    file), whose user errors print one line and exit 2. ``schema``: the dataclass the
    config is typed by, whose keys are the valid ones."""
    known = dotted_keys(OmegaConf.structured(schema))

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @functools.wraps(task)  # Hydra finds configs/ beside the file of the unwrapped task
        def checked_task(cfg: DictConfig) -> Any:
            try:
                check_config(cfg, known)
                absolute_data_paths(cfg, HydraConfig.get().runtime.cwd)
                return task(cfg)
            except USER_ERRORS as error:  # exit here: Hydra would add a line of its own
                fail(describe(error, known))
            except RuntimeError as error:  # another rank died or hangs: not this one's fault
                if message := peer_lost(error):
                    fail(message, status=1)
                raise

        hydra_main = hydra.main(version_base="1.3", config_path="configs",
                                config_name=config_name)(checked_task)

        @functools.wraps(task)
        def main() -> Any:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":  # the user asked for tracebacks
                return hydra_main()
            os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of reporting
            try:
                return hydra_main()
            except (HydraException, OmegaConfBaseException) as error:
                fail(describe(error, known))
            except OSError as error:  # Hydra creates the run directory and writes into it
                fail(f"{describe(error, known)} (hydra.run.dir, or hydra.sweep.dir with -m, "
                     "must be a folder that can be written)")

        return main

    return decorate


def fail(message: str, status: int = 2) -> NoReturn:
    """Print ``error: message`` once on stderr (and into the run's log file, if one is
    open, so that a run folder says why it stopped), then exit ``status``: 2 for a user
    error, 1 for a failure of the job (a lost rank)."""
    record = logging.LogRecord("transformer", logging.ERROR, __file__, 0, "error: %s",
                               (message,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def check_config(cfg: DictConfig, known: list[str]) -> None:
    """Refuse keys the schema lacks, then missing values and interpolations that fail."""
    unknown = [key for key in dotted_keys(cfg) if key not in known]
    if unknown:
        raise ConfigError("; ".join(unknown_key(key, known) for key in unknown))
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as error:
        raise ConfigError(describe(error, known)) from None


def dotted_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Every key of ``node``, dotted (``trainer.max_steps``); below a dataclass-typed node
    only: the keys of an untyped dict are free."""
    keys = []
    for key, value in node.items_ex(resolve=False):
        keys.append(f"{prefix}{key}")
        if isinstance(value, DictConfig) and is_dataclass(OmegaConf.get_type(value)):
            keys += dotted_keys(value, f"{prefix}{key}.")
    return keys


def unknown_key(key: str, known: list[str]) -> str:
    """``trainer.max_step is not a config key; did you mean trainer.max_steps?``"""
    part = part_of(key)
    if part and key != part:  # a key below a model part's entry: an argument of its class
        return (f"{key} is not a key of the {part} entry; +{key}=... adds it, if its class "
                "takes that argument")
    leaf = key.rpartition(".")[2]
    same_leaf = [name for name in known if name.rpartition(".")[2] == leaf]  # trainer.lr
    closest = same_leaf or difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {closest[0]}?" if closest else ""
    return f"{key} is not a config key{hint}"


def describe(error: Exception, known: list[str]) -> str:
    """One line for a Hydra, OmegaConf or project error, naming the key or file."""
    if isinstance(error, MissingConfigException) and error.options:
        group, _, option = (error.missing_cfg_file or "").rpartition("/")
        return (f"{group}={option}: no such option in configs/{group}/; choose one of "
                f"{', '.join(sorted(error.options))}")
    if isinstance(error, OverrideParseException):  # its second line links Hydra's grammar
        return f"cannot parse the override {error.override!r}: {error.message.splitlines()[0]}"
    not_a_group = re.match(r"Could not override '([^']+)'\. No match in the defaults list",
                           str(error))
    if not_a_group:  # evaluate.py model=tiny: a group of train.yaml, not of evaluate.yaml
        return unknown_key(not_a_group[1], known)
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror}"
    # Hydra wraps OmegaConf's error, which has the key: the override's or the YAML file's.
    cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else error
    key = getattr(cause, "full_key", None)
    if isinstance(cause, ConfigKeyError | ConfigAttributeError) and key:
        return unknown_key(key, known)
    if isinstance(cause, MissingMandatoryValue) and key:
        return f"{key} has no value: add {key}=... to the command line"
    if isinstance(cause, OmegaConfBaseException) and key:
        hint = f" (pick an entry: {part_of(key).replace('.', '/')}=NAME)" if part_of(key) == key \
            else ""
        return f"{key}: {first_lines(str(cause))}{hint}"
    return first_lines(str(error))


def part_of(key: str) -> str | None:
    """``model.ffn`` for ``model.ffn`` and the keys below it; None for other keys."""
    parts = [f"model.{part}" for part in PARTS]
    return next((part for part in parts if key == part or key.startswith(f"{part}.")), None)


def first_lines(message: str) -> str:
    """A multi-line message as one line: the first paragraph, without OmegaConf's
    ``full_key:`` / ``object_type=`` detail lines."""
    lines = []
    for line in message.strip().splitlines():
        if not line.strip() or line.startswith("    "):
            break
        lines.append(line.strip())
    return " ".join(lines)


def absolute_data_paths(cfg: DictConfig, start: str) -> None:
    """A relative ``data.root`` or ``$MULTI30K_DIR`` names a folder under the one the command
    started in: make it absolute, so that the recorded config (read again by evaluate.py
    from anywhere), ``hydra.job.chdir=true`` and subprocesses started elsewhere find it."""
    if os.environ.get("MULTI30K_DIR"):
        os.environ["MULTI30K_DIR"] = os.path.abspath(os.path.join(start,
                                                                  os.environ["MULTI30K_DIR"]))
    for key in DATA_PATH_KEYS:
        value = OmegaConf.select(cfg, key)
        if value:
            OmegaConf.update(cfg, key, os.path.abspath(os.path.join(start, value)))
    for extra in OmegaConf.select(cfg, "data.extra_train") or []:  # data/mixing.py
        if extra.root:
            extra.root = os.path.abspath(os.path.join(start, extra.root))
