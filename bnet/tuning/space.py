"""Search dimensions -> Optuna suggestions."""

from __future__ import annotations

from typing import Any

from bnet.config import Categorical, Dimension
from bnet.errors import ConfigError


def suggest(trial, dimensions: dict[str, Dimension]) -> dict[str, Any]:
    """One value per dimension, asked of an Optuna trial."""
    values: dict[str, Any] = {}
    for name, dim in dimensions.items():
        if isinstance(dim, Categorical):
            values[name] = trial.suggest_categorical(name, list(dim.choices))
        elif dim.is_int:
            values[name] = trial.suggest_int(name, dim.low, dim.high, step=int(dim.step or 1), log=dim.log)
        else:
            values[name] = trial.suggest_float(name, float(dim.low), float(dim.high), step=dim.step, log=dim.log)
    return values


def first_values(dimensions: dict[str, Dimension]) -> dict[str, Any]:
    """A representative point (first choice, lower bound) for checking configs up front."""
    return {
        name: dim.choices[0] if isinstance(dim, Categorical) else dim.low
        for name, dim in dimensions.items()
    }


def all_choices(dim: Dimension) -> list[Any]:
    """Every value a dimension can take, where that is a finite list."""
    if isinstance(dim, Categorical):
        return list(dim.choices)
    if dim.step is None:
        raise ValueError("continuous range")
    values, value = [], dim.low
    while value <= dim.high + 1e-12:
        values.append(value)
        value = value + dim.step
    return values


def grid(dimensions: dict[str, Dimension]) -> dict[str, list[Any]]:
    """The grid sampler's space: every dimension must be a list or a stepped range."""
    space = {}
    for name, dim in dimensions.items():
        try:
            space[name] = all_choices(dim)
        except ValueError:
            raise ConfigError(
                f"--sampler grid needs '{name}' to be a list or a range with a step"
            ) from None
    return space


def grid_size(dimensions: dict[str, Dimension]) -> int:
    size = 1
    for values in grid(dimensions).values():
        size *= len(values)
    return size


