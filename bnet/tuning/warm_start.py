"""Warm starts: a new study that begins from what earlier studies of the same model class found.

``--warm-start EXPERIMENT[:STUDY]`` picks the finished trial runs of earlier studies by an
MLflow query (the same family and model class, the new study's objective metric; fitted to
the same session file unless ``--warm-start-any-data``). Their best configurations that lie
in the new study's space are queued first, so its first trials are the earlier best ones
refitted on this data. Where the earlier runs were fitted to the **same** data, their results
also enter the study as prior trials that the sampler learns from (TPE's and the GP's models
start informed); on other data they are not, as their values answer another question.
Prior trials are never the study's own: they do not count towards ``n_trials``, are not its
answer and are not in its summary figure (Optuna's own plots in ``bnet report``, such as
the hyperparameter importances, include them: they are what the sampler learned from).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import optuna

from bnet.config import Categorical, Dimension
from bnet.errors import ConfigError, TrackingError
from bnet.tracking import conventions as tags
from bnet.tracking.query import RunSummary, best_runs
from bnet.tracking.store import Store
from bnet.tuning.family import Objective
from bnet.tuning.space import SearchSpace, distribution

PRIOR_ATTR = "bnet_prior_run"
N_QUEUED = 5
MAX_RUNS = 500


@dataclass
class WarmStart:
    """What an earlier study gives a new one."""

    source: str
    queued: list[dict[str, Any]] = field(default_factory=list)
    """Configurations to fit first, best first."""
    priors: list[optuna.trial.FrozenTrial] = field(default_factory=list)
    """Finished trials on the same data, for the sampler."""
    n_runs: int = 0
    """Earlier runs in scope."""
    n_outside: int = 0
    """Of those, runs whose configuration lies outside the new study's space."""

    def describe(self) -> str:
        if not self.n_runs:
            return f"warm start from {self.source}: no finished runs in scope; the study starts cold"
        said = f"warm start from {self.source}: {len(self.queued)} of its best configurations queued first"
        if self.priors:
            said += f", {len(self.priors)} of its trials on this data given to the sampler"
        return said + (f" ({self.n_outside} runs lie outside this study's space)" if self.n_outside else "")


def parse_source(text: str) -> tuple[str, str | None]:
    """``EXPERIMENT[:STUDY]`` as (experiment, study or None)."""
    experiment, _, study = text.partition(":")
    if not experiment:
        raise ConfigError(f"--warm-start '{text}': name an experiment (EXPERIMENT or EXPERIMENT:STUDY)")
    return experiment, study or None


def gather(source: str, any_data: bool, family: str, fixed: dict[str, Any], space: SearchSpace,
           objective: Objective, data_hash: str, store: Store, n_trials: int | float) -> WarmStart:
    """The earlier runs ``source`` names, as configurations to queue (the best
    :data:`N_QUEUED`, fewer where the study holds fewer trials) and prior trials."""
    experiment, study = parse_source(source)
    try:
        runs = best_runs(experiment, family, top=MAX_RUNS, study=study, metric=objective.metric,
                         direction=objective.direction, store=store, data_hash=None if any_data else data_hash)
    except TrackingError as err:
        raise ConfigError(f"--warm-start {source}: {err}") from None
    model_class = fixed.get("model_class")
    if model_class is not None:
        runs = [r for r in runs if r.tags.get(tags.TAG_MODEL_CLASS, model_class) == str(model_class)]
    warm = WarmStart(source, n_runs=len(runs))
    for run in runs:
        point = point_of(run.params, space)
        if point is None:
            warm.n_outside += 1
            continue
        if point not in warm.queued and len(warm.queued) < min(N_QUEUED, n_trials):
            warm.queued.append(point)
        if run.tags.get(tags.TAG_DATA_HASH) == data_hash and all(m in run.metrics for m in objective.metrics):
            warm.priors.append(_prior(run, point, space, objective))
    return warm


def point_of(params: dict[str, str], space: SearchSpace) -> dict[str, Any] | None:
    """A run's logged values of the searched hyperparameters, as a point of ``space``; None
    where one is missing or outside the space (a conditional one only where it is active)."""
    point: dict[str, Any] = {}
    for name in space.ordered():
        condition = space.conditions.get(name)
        if condition is not None and condition.parent in point and not condition.active(point[condition.parent]):
            continue
        value = _value_in(space.dimensions[name], params.get(name))
        if value is None:
            return None
        point[name] = value
    return point


def _value_in(dim: Dimension, logged: str | None) -> Any:
    if logged is None:
        return None
    if isinstance(dim, Categorical):
        return next((choice for choice in dim.choices if str(choice) == logged or _same_number(choice, logged)), None)
    try:
        value = int(float(logged)) if dim.is_int else float(logged)
    except ValueError:
        return None
    return value if dim.low <= value <= dim.high else None


def _same_number(choice: Any, logged: str) -> bool:
    try:
        return not isinstance(choice, (bool, str)) and math.isclose(float(choice), float(logged))
    except (TypeError, ValueError):
        return False


def _prior(run: RunSummary, point: dict[str, Any], space: SearchSpace,
           objective: Objective) -> optuna.trial.FrozenTrial:
    values = [run.metrics[m] for m in objective.metrics]
    return optuna.trial.create_trial(
        params=point, distributions={name: distribution(space.dimensions[name]) for name in point},
        values=values, user_attrs={PRIOR_ATTR: run.run_id})


def own_trials(study: optuna.Study, states=None) -> list[optuna.trial.FrozenTrial]:
    """The study's trials without the prior trials a warm start gave its sampler."""
    return [t for t in study.get_trials(deepcopy=False, states=states) if PRIOR_ATTR not in t.user_attrs]
