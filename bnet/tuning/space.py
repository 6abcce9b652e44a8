"""Search spaces: dimensions, conditional dimensions, and Optuna's define-by-run suggestions.

A conditional dimension exists only where another hyperparameter makes it matter (``kappa``
only for sticky transitions, ``n_hid_units`` only with hidden layers): it is asked of the
trial only then, so the sampler never models a value that did nothing, and elsewhere it
takes the value the model then uses, which is also the value logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from bnet.config import Categorical, Dimension, Range
from bnet.errors import ConfigError


@dataclass(frozen=True)
class Condition:
    """A dimension that is searched only where ``parent``'s value passes ``active``.

    Attributes:
        parent: the hyperparameter it depends on.
        active: whether a value of ``parent`` makes the dimension matter.
        inactive: the value the model uses where it does not.
        description: when it is active, in words (for summaries).
    """

    parent: str
    active: Callable[[Any], bool]
    inactive: Any
    description: str


@dataclass
class SearchSpace:
    """The dimensions a study searches, and the conditions among them."""

    dimensions: dict[str, Dimension]
    conditions: dict[str, Condition] = field(default_factory=dict)

    @classmethod
    def split(cls, values: dict[str, Any], conditions: dict[str, Condition]) -> tuple["SearchSpace", dict[str, Any]]:
        """The space searched over ``values`` (lists and ranges) and the fixed rest; a
        conditional dimension that a fixed value switches off is no dimension at all."""
        dimensions = {k: v for k, v in values.items() if isinstance(v, (Categorical, Range))}
        fixed = {k: v for k, v in values.items() if k not in dimensions}
        for name, condition in conditions.items():
            if name in dimensions and condition.parent in fixed and not condition.active(fixed[condition.parent]):
                del dimensions[name]
                fixed[name] = condition.inactive
        return cls(dimensions, conditions), fixed

    def __bool__(self) -> bool:
        return bool(self.dimensions)

    def ordered(self) -> list[str]:
        # parents before the dimensions that depend on them
        return sorted(self.dimensions, key=lambda name: name in self.conditions)

    def resolve(self, chosen: dict[str, Any], fixed: dict[str, Any]) -> dict[str, Any]:
        """Every hyperparameter of a point: fixed values, chosen ones, and the inactive
        value of each conditional hyperparameter whose parent switched it off."""
        values = {**fixed, **chosen}
        for name, condition in self.conditions.items():
            # both fixed: a contradiction is the model config's to refuse, not ours to mend
            searched = name in self.dimensions or condition.parent in self.dimensions
            if searched and name in values | self.dimensions and not condition.active(values.get(condition.parent)):
                values[name] = condition.inactive
        return values

    def suggest(self, trial) -> dict[str, Any]:
        """One value per active dimension, asked of an Optuna trial (define-by-run)."""
        chosen: dict[str, Any] = {}
        for name in self.ordered():
            condition = self.conditions.get(name)
            if condition is not None and condition.parent in self.dimensions and \
                    not condition.active(chosen.get(condition.parent)):
                continue
            chosen[name] = _suggest_one(trial, name, self.dimensions[name])
        return chosen

    def check_points(self, fixed: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """A representative point and one point per categorical choice: checking each
        makes a bad value anywhere in the space fail before the first run is created."""
        base = {name: _first(dim) for name, dim in self.dimensions.items()}
        yield self.resolve(base, fixed)
        for name, dim in self.dimensions.items():
            for choice in getattr(dim, "choices", ()):
                yield self.resolve({**base, name: choice}, fixed)
            if isinstance(dim, Range):
                yield self.resolve({**base, name: dim.high}, fixed)

    def grid(self) -> dict[str, list[Any]]:
        """The grid sampler's space: every dimension must be a list or a stepped range."""
        grid = {}
        for name, dim in self.dimensions.items():
            try:
                grid[name] = all_choices(dim)
            except ValueError:
                raise ConfigError(f"--sampler grid needs '{name}' to be a list or a range with a step") from None
        return grid

    def grid_size(self) -> int:
        size = 1
        for values in self.grid().values():
            size *= len(values)
        return size

    def describe(self) -> dict[str, str]:
        """``{name: "[low, high] log" or "(a, b)" [+ "when ..."]}`` for params and summaries."""
        described = {}
        for name, dim in self.dimensions.items():
            text = str(dim.choices) if isinstance(dim, Categorical) else f"[{dim.low}, {dim.high}]{' log' if dim.log else ''}"
            if name in self.conditions:
                text += f" when {self.conditions[name].description}"
            described[name] = text
        return described


def distribution(dim: Dimension):
    """The Optuna distribution a dimension is suggested from (and prior trials are recorded in)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(dim, Categorical):
        return CategoricalDistribution(list(dim.choices))
    if dim.is_int:
        return IntDistribution(dim.low, dim.high, step=int(dim.step or 1), log=dim.log)
    return FloatDistribution(float(dim.low), float(dim.high), step=dim.step, log=dim.log)


def _suggest_one(trial, name: str, dim: Dimension) -> Any:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    wanted = distribution(dim)
    if isinstance(wanted, CategoricalDistribution):
        return trial.suggest_categorical(name, wanted.choices)
    suggest = trial.suggest_int if isinstance(wanted, IntDistribution) else trial.suggest_float
    return suggest(name, wanted.low, wanted.high, step=wanted.step, log=wanted.log)


def _first(dim: Dimension) -> Any:
    return dim.choices[0] if isinstance(dim, Categorical) else dim.low


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
