"""Where runs, studies and artifacts live.

The store folder (``--store``, else ``$BNET_STORE``, else ``./bnet-store``) holds the
embedded SQLite MLflow store ``mlflow.db`` (runs and the model registry), the Optuna
storage ``optuna.db`` and ``artifacts/``. ``--tracking-uri`` / ``$BNET_TRACKING_URI`` and
``--storage`` point either database elsewhere (an ``mlflow server``, PostgreSQL) so that
workers on many machines share one study.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_STORE = "bnet-store"


@dataclass(frozen=True)
class Store:
    """Resolved locations of one bnet store.

    Attributes:
        root: the store folder.
        tracking_uri: MLflow tracking (and registry) URI.
        optuna_storage: Optuna storage URL (any SQLAlchemy URL).
        artifact_root: where new experiments keep artifacts, when tracking goes straight to
            a database (a tracking server decides for itself otherwise).
    """

    root: Path
    tracking_uri: str
    optuna_storage: str
    artifact_root: Path | None


def resolve_store(
    store: str | Path | None = None, tracking_uri: str | None = None, storage: str | None = None
) -> Store:
    root = Path(store or os.environ.get("BNET_STORE") or DEFAULT_STORE).resolve()
    tracking_uri = tracking_uri or os.environ.get("BNET_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
    # a database URL (SQLite, PostgreSQL) keeps artifacts in the store; a tracking server
    # (http[s]://) decides where its artifacts go
    artifact_root = None if tracking_uri.startswith(("http://", "https://")) else root / "artifacts"
    storage = storage or os.environ.get("BNET_OPTUNA_STORAGE") or f"sqlite:///{root / 'optuna.db'}"
    return Store(root, tracking_uri, storage, artifact_root)


def retry_schema_race(create, attempts: int = 6):
    """Run ``create`` (which may create database tables), retrying when another worker
    started on the same fresh database at the same moment and created them first."""
    import random
    import time

    from sqlalchemy.exc import DBAPIError

    for attempt in range(attempts):
        try:
            return create()
        except Exception as err:  # MLflow wraps SQLAlchemy's errors in its own
            cause = err if isinstance(err, DBAPIError) else err.__cause__ or err.__context__
            racing = isinstance(cause, DBAPIError) and (
                "already exists" in str(cause) or "duplicate key" in str(cause)
            )
            if not racing or attempt == attempts - 1:
                raise
            time.sleep(0.5 + random.random())


def connect(store: Store):
    """An MlflowClient on the store (creating the folder for embedded stores)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per download is noise in a CLI
    import logging

    import mlflow
    from mlflow.tracking import MlflowClient

    # "Creating initial MLflow database tables..." on every new store is noise in a CLI.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)

    if store.artifact_root is not None or store.optuna_storage.startswith("sqlite:"):
        store.root.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(store.tracking_uri)
    mlflow.set_registry_uri(store.tracking_uri)
    # the first client on a fresh database creates MLflow's schema
    return retry_schema_race(lambda: MlflowClient(tracking_uri=store.tracking_uri, registry_uri=store.tracking_uri))


def ensure_experiment(client, store: Store, name: str) -> str:
    """The id of experiment ``name``, created (artifacts under the store) if new."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    location = None
    if store.artifact_root is not None:
        store.artifact_root.mkdir(parents=True, exist_ok=True)
        location = (store.artifact_root / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


def refresh_statistics(store: Store) -> None:
    """Give an embedded SQLite store the table statistics its query planner needs.

    MLflow never runs ANALYZE; without statistics SQLite scans the metric table once per
    candidate run when ``best_runs`` orders by a metric (8.5 s at 10,000 runs, 0.15 s after
    ANALYZE; see bench/tracking_overhead.py).
    """
    if not store.tracking_uri.startswith("sqlite:///"):
        return
    import sqlite3

    with sqlite3.connect(store.tracking_uri[len("sqlite:///"):], timeout=60) as connection:
        connection.execute("ANALYZE")
