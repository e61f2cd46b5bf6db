"""The model's swappable parts, assembled from Hydra config groups.

Each part is a config group, ``configs/model/<part>/``, whose entries name a class::

    # configs/model/ffn/swiglu.yaml
    _target_: transformer.swiglu.SwiGLU  # the class
    _partial_: true                      # the model builds one a layer, giving the sizes
                                         # any other key: a keyword argument of the class

The model calls a part's class with the sizes, in this order (STYLE.md rule 3)::

    model/attention    (d_model, n_heads, dropout)  [positions=... under RoPE or ALiBi]
    model/positional   (d_model, max_len, dropout)
    model/norm         (d_model)
    model/ffn          (d_model, d_ff, dropout)

The valid choices of a part are the files of its folder (plus those of a folder added with
``hydra.searchpath``); ``choices(part)`` lists the built-in ones. ``factory`` turns an
entry into the callable the model is given, as ``hydra.utils.instantiate`` builds an entry
with ``_partial_: true``, with errors that name the config key.

Loading a checkpoint builds the classes its config names, and importing a module runs its
code. So an entry read from a checkpoint may name a class of this package or of
``torch.nn`` only, or of a module the caller trusts by name (``trusted``): a checkpoint
from elsewhere cannot make loading import ``os`` or the author's module. Every target must
be an ``nn.Module`` class, whatever the source.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from transformer.config import ConfigError

PARTS = ("attention", "positional", "norm", "ffn")  # the config groups under configs/model/
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
BUILT_IN = ("transformer", "torch.nn")  # modules whose classes any checkpoint may name


def choices(part: str) -> list[str]:
    """The entries of ``configs/model/<part>/``: what ``model/<part>=NAME`` may name."""
    return sorted(path.stem for path in (CONFIG_DIR / "model" / part).glob("*.yaml"))


def entry(part: str, name: str) -> dict[str, Any]:
    """The entry ``configs/model/<part>/<name>.yaml`` as a dict (for code that builds a
    ``ModelConfig`` without Hydra, e.g. a converted Marian model)."""
    path = CONFIG_DIR / "model" / part / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"model/{part}={name}: no such option in configs/model/{part}/; "
                          f"choose one of {', '.join(choices(part))}")
    return OmegaConf.to_container(OmegaConf.load(path))


class Part:
    """A config entry's class with its keyword arguments: ``part(*sizes)`` builds one
    module. Arguments that do not fit the class, or a ValueError of the class (a value it
    refuses), become a ConfigError naming the config key."""

    def __init__(self, key: str, target: str, cls: type, params: dict[str, Any]):
        self.key, self.target, self.cls, self.params = key, target, cls, params

    def __call__(self, *sizes: Any, **kwargs: Any) -> nn.Module:
        try:
            inspect.signature(self.cls).bind(*sizes, **self.params, **kwargs)
        except TypeError as error:
            if "positions" in kwargs and "positions" in str(error):
                raise ConfigError(
                    f"{self.key}: {self.target} takes no positions= argument, which "
                    "model.positional needs (it acts inside attention, as RoPE and ALiBi "
                    "do): add one, or choose another model/positional") from None
            raise ConfigError(f"{self.key}: {self.target}{sizes_text(sizes)} does not fit "
                              f"its signature: {error}") from None
        try:
            return self.cls(*sizes, **self.params, **kwargs)
        except ValueError as error:
            raise ConfigError(f"{self.key} ({self.target}): {error}") from error

    def __repr__(self) -> str:
        return f"Part({self.key}={self.target}, {self.params})"


def sizes_text(sizes: tuple[Any, ...]) -> str:
    return f" called with sizes {sizes}" if sizes else ""


def factory(node: Mapping[str, Any] | DictConfig, key: str,
            trusted: Iterable[str] | None = None) -> Part:
    """The callable that builds the part an entry names. ``key``: where the entry is in
    the config (``model.attention``), for error messages. ``trusted``: module names whose
    classes may be named besides ``BUILT_IN``'s; None trusts every module (the entry is the
    user's own config, not a checkpoint's)."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    target = node.get("_target_") if isinstance(node, Mapping) else None
    if not isinstance(target, str):
        raise ConfigError(f"{key} must name a class: {{_target_: package.module.Class, "
                          f"_partial_: true, ...}} (see configs/{key.replace('.', '/')}/)")
    if node.get("_partial_") is not True:
        raise ConfigError(f"{key}._partial_ must be true: the model builds one {key} a "
                          "layer, giving it the sizes")
    special = [name for name in node if name.startswith("_") and name not in
               ("_target_", "_partial_")]
    if special:
        raise ConfigError(f"{key}.{special[0]} is not supported here: an entry holds "
                          "_target_, _partial_ and the class's keyword arguments")
    if trusted is not None:
        check_trusted(target, key, trusted)
    cls = locate(target, key)
    params = {name: value for name, value in node.items() if not name.startswith("_")}
    check_parameters(cls, params, key, target)
    return Part(key, target, cls, params)


LOAD_HINT = "evaluate.py trust_modules=[{top}], or load_checkpoint(..., trust_modules=['{top}'])"


def check_trusted(target: str, key: str, trusted: Iterable[str], hint: str = LOAD_HINT
                  ) -> None:
    """Refuse (before importing anything) a class outside ``BUILT_IN`` and ``trusted``.
    ``hint``: how to trust it, with ``{top}`` for the top-level package."""
    if any(target.startswith(f"{module}.") for module in (*BUILT_IN, *trusted)):
        return
    module = target.rpartition(".")[0] or target
    how = hint.format(top=module.partition(".")[0])
    raise ConfigError(f"{key}._target_={target}: a checkpoint may name classes of "
                      f"{' and '.join(BUILT_IN)} only, unless you trust the module: loading "
                      f"it imports {module}, which runs its code ({how})")


def locate(target: str, key: str) -> type:
    """The class ``package.module.Class`` names: its module imported, an nn.Module."""
    module_name, _, name = target.rpartition(".")
    if not module_name or not name:
        raise ConfigError(f"{key}._target_={target} is not of the form package.module.Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"{key}._target_={target}: cannot import {module_name} ({error}); "
                          "install its package or put its folder on PYTHONPATH") from None
    cls = getattr(module, name, None)
    if cls is None:
        raise ConfigError(f"{key}._target_={target}: {module_name} has no {name}")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"{key}._target_={target} is not an nn.Module class")
    return cls


def check_parameters(cls: type, params: dict[str, Any], key: str, target: str) -> None:
    """Each key of the entry must be a parameter of the class (unless it takes
    ``**kwargs``): a typo stops at start-up, naming the key and the valid ones."""
    parameters = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    names = [name for name, p in parameters.items()
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                           inspect.Parameter.KEYWORD_ONLY)]
    for name in params:
        if name not in names:
            closest = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean {key}.{closest[0]}?" if closest else ""
            raise ConfigError(f"{key}.{name} is not a parameter of {target} (its "
                              f"parameters: {', '.join(names)}){hint}")


def targets(model_cfg: Mapping[str, Any]) -> dict[str, str]:
    """``{config key: class path}`` of the parts a model config names."""
    nodes = {f"model.{part}": model_cfg.get(part) for part in PARTS}
    return {key: node["_target_"] for key, node in nodes.items()
            if isinstance(node, Mapping) and isinstance(node.get("_target_"), str)}


def modules_to_trust(model_cfg: Mapping[str, Any]) -> list[str]:
    """The top-level packages outside ``BUILT_IN`` whose classes a model config names:
    what loading its checkpoint needs in ``trust_modules``."""
    packages = [target.partition(".")[0] for target in targets(model_cfg).values()
                if not any(target.startswith(f"{module}.") for module in BUILT_IN)]
    return sorted(set(packages))


def check_fine_tuning_parts(checkpoint_model: Mapping[str, Any],
                            own_model: Mapping[str, Any]) -> None:
    """``trainer.init_from``: the checkpoint's parts may be classes of ``BUILT_IN`` and of
    the modules this run's own config names (``model/attention=my_attention``); a
    ConfigError names any other, before anything is imported."""
    trusted = [target.rpartition(".")[0] for target in targets(own_model).values()]
    for key, target in targets(checkpoint_model).items():
        check_trusted(target, f"trainer.init_from: {key}", trusted,
                      "pick a part of {top} in this run's config, e.g. model/attention=...")


def upgrade_model_config(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's model config from before the parts were config groups: the strings
    ``positional: <kind>`` and ``activation: <name>`` become the entries of the same names
    (``configs/model/positional/<kind>.yaml``, ``configs/model/ffn/<name>.yaml``, which
    these rules reproduce: tests/test_components.py). Newer configs come back unchanged."""
    from transformer.feed_forward import FeedForward
    from transformer.positional import PositionalEncoding

    model_cfg = dict(model_cfg)
    if isinstance(model_cfg.get("positional"), str):
        model_cfg["positional"] = {"_target_": class_path(PositionalEncoding),
                                   "_partial_": True, "kind": model_cfg["positional"]}
    if "activation" in model_cfg:
        model_cfg["ffn"] = {"_target_": class_path(FeedForward), "_partial_": True,
                            "activation": model_cfg.pop("activation")}
    return model_cfg


def class_path(cls: type) -> str:
    """``transformer.feed_forward.FeedForward``: what ``_target_`` names a class by."""
    return f"{cls.__module__}.{cls.__qualname__}"
