"""Reading runs back: "the best model" is a query, never a folder."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from bnet.errors import TrackingError
from bnet.tracking import conventions as tags
from bnet.tracking.run_search import RunSearch, TagCondition, filter_string, find_runs, first_run
from bnet.tracking.store import Store, connect


@dataclass
class RunSummary:
    """A finished run as the CLI and API report it."""

    run_id: str
    experiment_id: str
    run_name: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    artifact_uri: str

    @classmethod
    def from_run(cls, run) -> "RunSummary":
        return cls(
            run_id=run.info.run_id,
            experiment_id=run.info.experiment_id,
            run_name=run.info.run_name,
            status=run.info.status,
            params=dict(run.data.params),
            metrics=dict(run.data.metrics),
            tags={k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
            artifact_uri=run.info.artifact_uri,
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "run_name": self.run_name,
            "experiment_id": self.experiment_id,
            "params": self.params,
            "metrics": self.metrics,
            "tags": self.tags,
            "artifact_uri": self.artifact_uri,
        }

    @property
    def family(self) -> str | None:
        return self.tags.get(tags.TAG_FAMILY)

    @property
    def artifact_run_id(self) -> str:
        """The run holding this run's model and exports: itself, or for a trial answered by
        an earlier fit of another study, that fit's run."""
        return self.tags.get(tags.TAG_REUSED_RUN, self.run_id)


def trial_conditions(family: str | None = None, study: str | None = None,
                     extra: dict[str, str] | None = None) -> tuple[TagCondition, ...]:
    """The tags of trial runs of a family (and study, and any ``extra`` tag values)."""
    conditions = [TagCondition(tags.TAG_ROLE, tags.ROLE_TRIAL)]
    if family:
        conditions.append(TagCondition(tags.TAG_FAMILY, family))
    if study:
        conditions.append(TagCondition(tags.TAG_STUDY, study))
    conditions += [TagCondition(key, value) for key, value in (extra or {}).items()]
    return tuple(conditions)


def trial_filter(family: str | None = None, study: str | None = None,
                 extra: dict[str, str] | None = None) -> str:
    """The filter of finished trial runs of a family (and study), for ``search_runs``."""
    return filter_string(trial_conditions(family, study, extra))


def _experiment_id(client, experiment: str) -> str:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise TrackingError(f"no MLflow experiment named '{experiment}' in the tracking store")
    return found.experiment_id


def _scope(data_hash: str | None) -> dict[str, str]:
    return {tags.TAG_DATA_HASH: data_hash} if data_hash else {}


def _trials(client, experiment: str, family: str | None, study: str | None, data_hash: str | None,
            any_order: bool = False) -> RunSearch:
    return RunSearch(_experiment_id(client, experiment), trial_conditions(family, study, _scope(data_hash)),
                     any_order=any_order)


def study_objective(experiment: str, family: str | None = None, study: str | None = None,
                    data_hash: str | None = None, store: Store | None = None) -> tuple[str, str]:
    """(metric, direction) that the finished runs in scope were optimised for, as their
    studies recorded it; an error when the scope mixes studies of different objectives."""
    from bnet.tracking.store import resolve_store

    store = store or resolve_store()
    client = connect(store)
    trials = _trials(client, experiment, family, study, data_hash, any_order=True)
    first = first_run(client, store, trials.with_conditions(TagCondition(tags.TAG_OBJECTIVE, "", "!=")))
    if first is None:
        raise TrackingError(f"experiment '{experiment}' has no finished {family or 'bnet'} runs"
                            + (f" in study '{study}'" if study else "")
                            + (f" fitted to this data (hash {data_hash})" if data_hash else ""))
    metric = first.data.tags[tags.TAG_OBJECTIVE]
    direction = first.data.tags.get(tags.TAG_DIRECTION, "minimize")
    other = first_run(client, store, trials.with_conditions(TagCondition(tags.TAG_OBJECTIVE, metric, "!=")))
    if other is not None:
        raise TrackingError(
            f"experiment '{experiment}' holds {family or 'bnet'} studies optimising {metric} and "
            f"{other.data.tags.get(tags.TAG_OBJECTIVE)}: name one with --study (or rank by --metric)")
    return metric, direction


def metric_direction(experiment: str, metric: str, family: str | None = None, study: str | None = None,
                     data_hash: str | None = None, store: Store | None = None) -> str:
    """The direction in which the studies in scope optimised ``metric`` or the validation
    metric it is the test counterpart of (as their runs recorded it); an error when they
    disagree, or when none optimised it (then the caller names the direction)."""
    from bnet.tracking.store import resolve_store

    store = store or resolve_store()
    client = connect(store)
    trials = _trials(client, experiment, family, study, data_hash, any_order=True)
    found: set[str] = set()
    # the metric itself, or the held-out counterpart of what the study optimised
    # (test_r2 of val_r2, test_loss of best_val_loss) is better in the same direction
    for objective in dict.fromkeys((metric, metric.replace("test_", "val_", 1), metric.replace("test_", "best_val_", 1))):
        for direction in ("minimize", "maximize"):
            if first_run(client, store, trials.with_conditions(TagCondition(tags.TAG_OBJECTIVE, objective),
                                                               TagCondition(tags.TAG_DIRECTION, direction))):
                found.add(direction)
    # a multi-objective study records "minimize a, maximize b"
    multi = trials.with_conditions(TagCondition(tags.TAG_OBJECTIVES, f"%{metric}%", "LIKE"))
    for run in itertools.islice(find_runs(client, store, multi, page_size=50), 50):
        for part in run.data.tags[tags.TAG_OBJECTIVES].split(","):
            direction, _, name = part.strip().partition(" ")
            if name == metric:
                found.add(direction)
    if len(found) > 1:
        raise TrackingError(f"studies of experiment '{experiment}' optimised {metric} in both directions: "
                            f"name one with --study, or say --direction")
    if not found:
        raise TrackingError(f"no study of experiment '{experiment}'"
                            + (f" ('{study}')" if study else "")
                            + f" optimised {metric}, so its better direction is unknown: say --direction "
                              "minimize or maximize")
    return found.pop()


def best_runs(
    experiment: str,
    family: str | None = None,
    top: int = 1,
    study: str | None = None,
    metric: str | None = None,
    direction: str | None = None,
    store: Store | None = None,
    data_hash: str | None = None,
) -> list[RunSummary]:
    """The ``top`` finished trial runs of ``experiment`` ordered by ``metric``, best first.

    Args:
        experiment: MLflow experiment name.
        family: only runs of this family (``ae``, ``arhmm``, ...).
        top: how many runs.
        study: only runs of this Optuna study.
        metric: the run metric to rank by (its final logged value); default the metric
            the runs' studies optimised (tag ``bnet.objective``), with its direction.
        direction: ``minimize`` or ``maximize`` (default: the direction the studies in scope
            optimised ``metric`` in; an error where none did).
        store: the store to query (default: resolved like the CLI's).
        data_hash: only runs fitted to the session file with this digest.
    """
    from bnet.tracking.store import resolve_store

    if top < 1:
        raise TrackingError(f"top must be at least 1, got {top}")
    store = store or resolve_store()
    client = connect(store)
    trials = _trials(client, experiment, family, study, data_hash)
    if metric is None:
        metric, recorded = study_objective(experiment, family, study, data_hash, store)
        direction = direction or recorded
    direction = direction or metric_direction(experiment, metric, family, study, data_hash, store)
    ranked = RunSearch(trials.experiment_id, trials.conditions, metric, ascending=direction == "minimize")
    # a fit answers every trial that reused it: it is listed once, as its first run in order
    found: dict[str, RunSummary] = {}
    for run in map(RunSummary.from_run, find_runs(client, store, ranked, page_size=top)):
        found.setdefault(run.artifact_run_id, run)
        if len(found) == top:
            break
    return list(found.values())


def find_config_run(experiment_id: str, config_hash: str, store: Store) -> RunSummary | None:
    """The first finished trial run of this exact fit (BehaveNet's ``experiment_exists``)."""
    client = connect(store)
    run = first_run(client, store, RunSearch(experiment_id, trial_conditions(extra={tags.TAG_CONFIG_HASH: config_hash})))
    return RunSummary.from_run(run) if run else None


def trial_families(experiment: str, store: Store) -> set[str]:
    """The families of the finished trial runs of an experiment."""
    client = connect(store)
    trials = RunSearch(_experiment_id(client, experiment), trial_conditions(), any_order=True)
    families: set[str] = set()
    while True:
        others = [TagCondition(tags.TAG_FAMILY, family, "!=") for family in sorted(families)]
        found = first_run(client, store, trials.with_conditions(*others))
        if found is None or not found.data.tags.get(tags.TAG_FAMILY):
            return families
        families.add(found.data.tags[tags.TAG_FAMILY])


def experiment_links(store: Store) -> list[tuple[str, str]]:
    """(name, id) of every experiment in the store."""
    return [(e.name, e.experiment_id) for e in connect(store).search_experiments()]


def get_run(run_id: str, store: Store | None = None) -> RunSummary:
    from mlflow.exceptions import MlflowException

    from bnet.tracking.store import resolve_store

    client = connect(store or resolve_store())
    try:
        return RunSummary.from_run(client.get_run(run_id))
    except MlflowException:
        raise TrackingError(f"no run with id '{run_id}' in the tracking store") from None


def fitted_datasets(store: Store) -> set[str]:
    """The ``lab/expt/animal/session`` ids that finished trials in the store were fitted to
    (multi-session fits count for each member): BehaveNet's ``all_source: save``."""
    client = connect(store)
    experiments = [e.experiment_id for e in client.search_experiments()]
    found: set[str] = set()
    if not experiments:
        return found
    token = None
    while True:
        page = client.search_runs(experiments, trial_filter(), max_results=1000, page_token=token)
        for run in page:
            found.update(d for d in run.data.tags.get(tags.TAG_DATASET, "").split("+") if d.count("/") == 3)
        token = page.token
        if not token:
            return found
