"""Reading runs back: "the best model" is a query, never a folder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bnet.errors import TrackingError
from bnet.tracking import conventions as tags
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


def _quote(value: str) -> str:
    return "'" + str(value).replace("'", "\\'") + "'"


def trial_filter(family: str | None = None, study: str | None = None,
                 extra: dict[str, str] | None = None) -> str:
    """The filter of finished trial runs of a family (and study), for ``search_runs``."""
    clauses = ["attributes.status = 'FINISHED'", f"tags.`{tags.TAG_ROLE}` = '{tags.ROLE_TRIAL}'"]
    if family:
        clauses.append(f"tags.`{tags.TAG_FAMILY}` = {_quote(family)}")
    if study:
        clauses.append(f"tags.`{tags.TAG_STUDY}` = {_quote(study)}")
    for key, value in (extra or {}).items():
        clauses.append(f"tags.`{key}` = {_quote(value)}")
    return " and ".join(clauses)


def best_runs(
    experiment: str,
    family: str | None = None,
    top: int = 1,
    study: str | None = None,
    metric: str = "best_val_loss",
    direction: str = "minimize",
    store: Store | None = None,
) -> list[RunSummary]:
    """The ``top`` finished trial runs of ``experiment`` ordered by ``metric``, best first.

    Args:
        experiment: MLflow experiment name.
        family: only runs of this family (``ae``, ``arhmm``, ...).
        top: how many runs.
        study: only runs of this Optuna study.
        metric: the run metric to rank by (its final logged value).
        direction: ``minimize`` or ``maximize``.
        store: the store to query (default: resolved like the CLI's).
    """
    from bnet.tracking.store import resolve_store

    if top < 1:
        raise TrackingError(f"top must be at least 1, got {top}")
    client = connect(store or resolve_store())
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise TrackingError(f"no MLflow experiment named '{experiment}' in the tracking store")
    order = "ASC" if direction == "minimize" else "DESC"
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=trial_filter(family, study) + f" and metrics.`{metric}` > -1e308",
        order_by=[f"metrics.`{metric}` {order}", "attributes.start_time ASC"],
        max_results=top,
    )
    return [RunSummary.from_run(run) for run in runs]


def get_run(run_id: str, store: Store | None = None) -> RunSummary:
    from mlflow.exceptions import MlflowException

    from bnet.tracking.store import resolve_store

    client = connect(store or resolve_store())
    try:
        return RunSummary.from_run(client.get_run(run_id))
    except MlflowException:
        raise TrackingError(f"no run with id '{run_id}' in the tracking store") from None
