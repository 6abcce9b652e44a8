"""``tune``: one entry point for every family's studies (the CLI's ``bnet tune <family>``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bnet.config import Categorical, ProjectConfig, Range
from bnet.errors import ConfigError
from bnet.tracking.store import Store, resolve_store
from bnet.tuning.family import StudyRequest, get_family, merged_values
from bnet.tuning.space import SearchSpace
from bnet.tuning.study import Echo, StudyOutcome, StudySpec, run_study


def tune(
    family: str,
    data: str | Path | None = None,
    experiment: str | None = None,
    config: ProjectConfig | None = None,
    upstream: dict[str, tuple[str | None, str | None]] | None = None,
    target: str | None = None,
    labels: bool = False,
    tuning_options: dict[str, Any] | None = None,
    fixed_options: dict[str, Any] | None = None,
    store: Store | None = None,
    echo: Echo = print,
) -> list[StudyOutcome]:
    """Run (or resume) the studies a family prepares from a session (one, or one per
    neuron subset for decoders).

    Args:
        family: ``ae``, ``arhmm`` or ``decoder``.
        data: the session file (default: the config's).
        experiment: MLflow experiment (default: the config's).
        config: the project config (fixed values, search space, tuning).
        upstream: ``{family: (reference, experiment)}`` of upstream runs (``best``, a run
            id or ``models:/NAME@ALIAS``).
        target: a decoder's behaviour target; labels: segment labels (ARHMM).
        tuning_options: ``n_trials``, ``sampler``, ``pruner``, ``seed``, ``study`` (None keeps).
        fixed_options: fixed hyperparameters from CLI options (None keeps).
    """
    declared = get_family(family)
    config = config or ProjectConfig()
    store = store or resolve_store()
    config.override(**(fixed_options or {}))
    tuning = config.tuning
    for name, value in (tuning_options or {}).items():
        if value is not None:
            setattr(tuning, name, value)
    tuning.validate()
    experiment = experiment or config.experiment
    if not experiment:
        raise ConfigError("no experiment name: pass --experiment NAME or set experiment in the config")
    for note in config.notes:
        echo(f"note: {note}")

    request = StudyRequest(data, {}, upstream or {}, target, labels)
    values, defaulted = merged_values(declared, config)
    values.setdefault("model_class", declared.default_model_class(request))
    request.values = values
    dimensions = {k: v for k, v in values.items() if isinstance(v, (Categorical, Range))}
    fixed = {k: v for k, v in values.items() if k not in dimensions}
    for name, condition in declared.conditions.items():
        # a dimension that a fixed value switches off is no dimension at all
        if name in dimensions and condition.parent in fixed and not condition.active(fixed[condition.parent]):
            del dimensions[name]
            fixed[name] = condition.inactive
    space = SearchSpace(dimensions, declared.conditions)
    if defaulted and space:
        echo(f"note: the config searches nothing, so the {family} default space is searched: "
             + ", ".join(f"{k} {v}" for k, v in space.describe().items()))

    prepared = declared.prepare(request, store)
    for study in prepared:
        for point in space.check_points(fixed):
            study.fitter.check(point)
        metric, direction = tuning.metric, tuning.direction
        if (metric and metric != study.objective.metric) or (direction and direction != study.objective.direction):
            raise ConfigError(f"{family} studies of this data optimise {study.objective.direction} "
                              f"{study.objective.metric}; tuning.metric/direction cannot name another yet")
    return [run_study(StudySpec(experiment, declared, study, tuning, space, fixed, store), echo)
            for study in prepared]
