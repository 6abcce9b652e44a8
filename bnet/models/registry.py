"""Models built by name.

Each model file registers its classes with :func:`register`; everything else builds models
with :func:`build_model` from a config whose ``model_class`` names the entry, and rebuilds
them from checkpoints the same way. Adding a model is one module under ``bnet/models/``
(or a distribution's module named by a ``bnet.models`` entry point) with one decorator:
every such module is imported before the registry is read (:mod:`bnet.extensions`).

A class's config dataclass declares its hyperparameters: its fields (less those marked
:data:`bnet.config.FILLED`) are the keys a config file may set for it, under their
``key`` metadata where BehaveNet's names are dotted.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

from bnet.errors import ConfigError
from bnet.extensions import load_all


@dataclass(frozen=True)
class ModelEntry:
    """A registered model class: how to configure it and how to build it."""

    model_class: str
    family: str
    config_type: type
    builder: Callable[[Any], Any]


_REGISTRY: dict[str, ModelEntry] = {}


def register(model_class: str, family: str, config_type: type) -> Callable:
    """Class decorator: make ``model_class`` buildable from a ``config_type`` instance."""

    def decorate(builder: Callable) -> Callable:
        if model_class in _REGISTRY:
            raise RuntimeError(f"model_class '{model_class}' registered twice")
        _REGISTRY[model_class] = ModelEntry(model_class, family, config_type, builder)
        return builder

    return decorate


def model_entry(model_class: str) -> ModelEntry:
    _load_builtin_models()
    try:
        return _REGISTRY[model_class]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ConfigError(f"unknown model_class '{model_class}' (known: {known})") from None


def model_classes(family: str | None = None) -> list[str]:
    _load_builtin_models()
    return sorted(k for k, e in _REGISTRY.items() if family is None or e.family == family)


def build_model(config: Any):
    """Build the model a config describes (its ``model_class`` picks the entry)."""
    return model_entry(config.model_class).builder(config)


def hyperparameter_keys(config_type: type) -> frozenset[str]:
    """The config keys a model config dataclass takes."""
    from bnet.config import is_filled

    return frozenset(f.metadata.get("key", f.name) for f in fields(config_type) if not is_filled(f))


def declared_keys() -> frozenset[str]:
    """Every config key some registered model class takes."""
    _load_builtin_models()
    return frozenset().union(*(hyperparameter_keys(e.config_type) for e in _REGISTRY.values()))


def keys_not_taken(model_classes: list[str], keys) -> list[str]:
    """Those of ``keys`` that another class of the same family takes but none of
    ``model_classes`` does (``vae.beta`` for an ``ae``): accepted, and changing nothing."""
    chosen = [model_entry(c) for c in model_classes]
    families = {e.family for e in chosen}
    taken = frozenset().union(*(hyperparameter_keys(e.config_type) for e in chosen))
    others = frozenset().union(*(hyperparameter_keys(e.config_type) for e in _REGISTRY.values()
                                 if e.family in families))
    return sorted(k for k in keys if k in others and k not in taken)


def config_from_dict(values: dict[str, Any]):
    """Rebuild a model config from the plain dict stored in a checkpoint or run params."""
    entry = model_entry(values["model_class"])
    names = {f.name for f in fields(entry.config_type)}
    return entry.config_type(**{k: v for k, v in values.items() if k in names})


def _load_builtin_models() -> None:
    load_all("bnet.models", "bnet.models")  # importing the modules runs their @register decorators
