"""``tune``: one entry point for every family's studies (the CLI's ``bnet tune <family>``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bnet.config import Categorical, ProjectConfig, TuningConfig, parse_value, plain_value
from bnet.errors import ConfigError
from bnet.models.registry import keys_not_taken
from bnet.progress import Echo, say
from bnet.tracking import conventions as tags
from bnet.tracking.store import Store, resolve_store
from bnet.tuning.family import (
    Objective, PreparedStudy, StudyRequest, family_names, get_family, merged_values,
)
from bnet.tuning.space import SearchSpace
from bnet.tuning.study import StudyOutcome, StudySpec, run_study


def tune(
    family: str,
    data: str | Path | None = None,
    experiment: str | None = None,
    config: ProjectConfig | None = None,
    *,
    n_trials: int | None = None,
    budget_steps: int | None = None,
    timeout: float | None = None,
    warm_start: str | None = None,
    warm_start_any_data: bool | None = None,
    system_metrics: bool | None = None,
    max_steps: int | None = None,
    sampler: str | None = None,
    pruner: str | None = None,
    seed: int | None = None,
    study: str | None = None,
    metric: str | list | None = None,
    direction: str | list | None = None,
    scheduler: str | None = None,
    population: int | None = None,
    perturbation_interval: int | None = None,
    device: str | None = None,
    store: Store | None = None,
    echo: Echo = say,
    **family_options: Any,
) -> list[StudyOutcome]:
    """Run (or resume) the studies a family prepares from a session (one, or one per
    neuron subset for decoders). Arguments left as None come from ``config``, then from the
    family's defaults (its default space when the config searches nothing, its budget).

    Args:
        family: a registered family's name (``ae``, ``arhmm``, ``decoder``, ...).
        data: the session file (default: the config's).
        experiment: MLflow experiment (default: the config's).
        config: the project config (fixed values, search space, tuning).
        n_trials, budget_steps, timeout, sampler, pruner, seed, study, metric, direction,
            warm_start, warm_start_any_data, system_metrics: the search (``tuning`` in the config; a list of
            metrics makes a multi-objective study).
        scheduler, population, perturbation_interval: ``pbt`` trains a population instead
            (:mod:`bnet.tuning.pbt`), for families trained by epochs.
        max_steps: the family's budget per trial (``max_n_epochs``, or ``n_iters`` of EM).
        device: ``cpu``, ``cuda`` or ``auto``.
        family_options: for each family the study reads (:attr:`Family.upstream`), its run
            as ``ae=`` (``best``: the best one fitted to this file, a run id or
            ``models:/NAME@ALIAS``) and where ``best`` looks as ``ae_experiment=``; and the
            family's own options (:attr:`Family.options`), e.g. a decoder's ``target=``.
    """
    declared = get_family(family)
    config = config or ProjectConfig()
    store = store or resolve_store()
    upstream, options = declared.request_options(dict(family_options))
    config.override(**{declared.budget_key: max_steps, "device": device},
                    **{o.name: options.pop(o.name, None) for o in declared.options if o.config_key})
    tuning = config.tuning
    for name, value in (("n_trials", n_trials), ("budget_steps", budget_steps), ("timeout", timeout),
                        ("warm_start", warm_start), ("warm_start_any_data", warm_start_any_data),
                        ("system_metrics", system_metrics),
                        ("sampler", sampler), ("pruner", pruner), ("seed", seed),
                        ("study", study), ("metric", metric), ("direction", direction), ("scheduler", scheduler),
                        ("population", population), ("perturbation_interval", perturbation_interval)):
        if value is not None:
            setattr(tuning, name, value)
    tuning.validate()
    if tuning.scheduler == "pbt" and not declared.population_based:
        raise ConfigError(f"--scheduler pbt trains families fitted by epochs from checkpoints "
                          f"({', '.join(n for n in family_names() if get_family(n).population_based)}), not {family}")
    experiment = experiment or config.experiment
    if not experiment:
        raise ConfigError("no experiment name: pass --experiment NAME or set experiment in the config")
    for note in config.notes:
        echo(f"note: {note}")

    request = StudyRequest(data, {}, upstream, options)
    values, defaulted = merged_values(declared, config)
    values.setdefault("model_class", declared.default_model_class(request))
    request.values = values
    chosen = values["model_class"]
    classes = [str(c) for c in (chosen.choices if isinstance(chosen, Categorical) else [chosen])]
    not_taken = keys_not_taken(classes, values)
    if not_taken:
        echo(f"note: model_class {' or '.join(classes)} takes no {', '.join(not_taken)}: accepted and ignored")
    space, fixed = SearchSpace.split(values, declared.conditions)
    if defaulted and space:
        echo(f"note: the config searches nothing, so the {family} default space is searched: "
             + ", ".join(f"{k} {v}" for k, v in space.describe().items()))

    for point in tuning.enqueue or ():
        unknown = sorted(set(point) - set(space.dimensions))
        if unknown:
            raise ConfigError(f"tuning.enqueue names {', '.join(unknown)}, which the study does not search "
                              f"(it searches {', '.join(space.dimensions) or 'nothing'})")
    prepared = declared.prepare(request, store)
    for study in prepared:
        for point in space.check_points(fixed):
            study.fitter.check(point)
        study.objective = chosen_objective(family, study, tuning, space.check_points(fixed))
    outcomes = []
    for study in prepared:
        upstream_runs = {key[len(tags.UPSTREAM_TAG_PREFIX):].removesuffix("_run_id"): run_id
                         for key, run_id in study.run_tags.items() if key.startswith(tags.UPSTREAM_TAG_PREFIX)}
        recipe = {"family": family, "experiment": experiment, "data": str(study.session.path),
                  "values": {k: plain_value(v) for k, v in values.items()}, "study": tuning.study or experiment,
                  "tuning": {"n_trials": tuning.n_trials, "budget_steps": tuning.budget_steps,
                             "timeout": tuning.timeout, "sampler": tuning.sampler, "pruner": tuning.pruner,
                             "seed": tuning.seed, "metric": tuning.metric, "direction": tuning.direction,
                             "system_metrics": tuning.system_metrics},
                  "options": options, "upstream": upstream_runs}
        spec = StudySpec(experiment, declared, study, tuning, space, fixed, store, recipe)
        if tuning.scheduler == "pbt":
            from bnet.tuning.pbt import run_population

            outcomes.append(run_population(spec, echo))
        else:
            outcomes.append(run_study(spec, echo))
    return outcomes


def chosen_objective(family: str, study: PreparedStudy, tuning: TuningConfig, points) -> Objective:
    """The objective the user chose (``tuning.metric``/``direction``), else the family's."""
    default = study.objective
    metrics = tuning.metric if isinstance(tuning.metric, list) else [tuning.metric or default.metric]
    directions = tuning.direction if isinstance(tuning.direction, list) else [tuning.direction] * len(metrics)
    if metrics == [default.metric] and directions[0] in (None, default.direction):
        return default
    names: dict[str, str] = {}
    for i, point in enumerate(points):
        found = study.fitter.metric_names(point)
        names = found if i == 0 else {k: v for k, v in names.items() if k in found}
    unknown = [m for m in metrics if m not in names]
    if unknown:
        raise ConfigError(f"tuning.metric {', '.join(unknown)}: not a metric every trial of this study logs "
                          f"(they log {', '.join(sorted(names))})")
    chosen = [(m, d or names[m]) for m, d in zip(metrics, directions)]
    metric, direction = chosen[0]
    # the pruner sees the per-epoch series of a best-epoch metric (best_val_x -> val_x)
    step = metric.removeprefix("best_") if metric.startswith("best_val_") else ""
    return Objective(metric, direction, step, tuple(chosen[1:]))


def join_study(study: str, store: Store | None = None, data: str | Path | None = None, n_trials: int | None = None,
               device: str | None = None, echo: Echo = say) -> list[StudyOutcome]:
    """Join a study another worker started, from what it recorded (``bnet worker``): the same
    family, data, config and upstream runs, from any machine that reaches its storage."""
    import optuna

    from bnet.tracking.secrets import redact
    from bnet.tuning.study import RECIPE_ATTR

    store = store or resolve_store()
    try:
        recorded = optuna.load_study(study_name=study, storage=store.optuna_storage)
    except KeyError:
        raise ConfigError(f"no study '{study}' in {redact(store.optuna_storage)}") from None
    recipe = recorded.user_attrs.get(RECIPE_ATTR)
    if recipe is None:
        raise ConfigError(f"study '{study}' was not started by bnet tune (it records no recipe to join)")
    config = ProjectConfig(recipe["experiment"], {k: parse_value(k, v, f"study '{study}'")
                                                  for k, v in recipe["values"].items()})
    tuning = recipe["tuning"] | ({"n_trials": n_trials} if n_trials else {})
    # recipes of bnet 0.1 kept a decoder's target and an ARHMM's labels switch at the top
    options = recipe.get("options", {k: recipe[k] for k in ("target", "labels") if recipe.get(k)})
    return tune(recipe["family"], data or recipe["data"], recipe["experiment"], config, study=recipe["study"],
                device=device, store=store, echo=echo, **tuning, **recipe["upstream"], **options)
