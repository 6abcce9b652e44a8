"""Where runs, studies and artifacts live.

The store folder (``--store``, else ``$BNET_STORE``, else ``./bnet-store``) holds the
embedded SQLite MLflow store ``mlflow.db`` (runs and the model registry), the Optuna
storage ``optuna.db`` and ``artifacts/``. ``--tracking-uri`` / ``$BNET_TRACKING_URI`` and
``--storage`` point either database elsewhere (an ``mlflow server``, PostgreSQL) so that
workers on many machines share one study.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bnet.errors import TrackingError

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
    store: str | Path | None = None, tracking_uri: str | None = None, storage: str | None = None,
    serving: bool = False,
) -> Store:
    """Where runs, studies and artifacts live: the arguments, else the environment the CLI's
    options also read (``BNET_STORE``; ``BNET_TRACKING_URI``, then MLflow's own
    ``MLFLOW_TRACKING_URI``; ``BNET_OPTUNA_STORAGE``), else the store folder's databases.
    ``serving``: for the commands that serve a store's database (``bnet ui``, ``bnet
    server``), a tracking server the environment names (``http://...``) is not one."""
    root = Path(store or os.environ.get("BNET_STORE") or DEFAULT_STORE).resolve()
    from_environment = os.environ.get("BNET_TRACKING_URI") or os.environ.get("MLFLOW_TRACKING_URI")
    if serving and from_environment and from_environment.startswith(("http://", "https://")):
        from_environment = None
    tracking_uri = tracking_uri or from_environment or f"sqlite:///{root / 'mlflow.db'}"
    # a database URL (SQLite, PostgreSQL) keeps artifacts in the store; a tracking server
    # (http[s]://) decides where its artifacts go
    artifact_root = None if tracking_uri.startswith(("http://", "https://")) else root / "artifacts"
    storage = storage or os.environ.get("BNET_OPTUNA_STORAGE") or f"sqlite:///{root / 'optuna.db'}"
    return Store(root, tracking_uri, storage, artifact_root)


# what a worker sees when another one creates or migrates the same fresh database first
_SCHEMA_RACE = ("already exists", "duplicate key", "alembic_version", "database is locked")


def retry_schema_race(create, attempts: int = 8):
    """Run ``create`` (which may create database tables), retrying when another worker
    started on the same fresh database at the same moment and created them first."""
    import random
    import time

    from bnet.tracking.runs import error_chain

    for attempt in range(attempts):
        try:
            return create()
        except Exception as err:  # MLflow wraps SQLAlchemy's and Alembic's errors in its own
            racing = any(sign in error_chain(err) for sign in _SCHEMA_RACE)
            if not racing or attempt == attempts - 1:
                raise
            time.sleep(0.5 + random.random())


def connect(store: Store):
    """An MlflowClient on the store (creating the folder for embedded stores)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per download is noise in a CLI
    import logging

    from mlflow.tracking import MlflowClient

    # "Creating initial MLflow database tables..." on every new store is noise in a CLI, and so
    # is the traceback it logs for every call a database restart interrupts: bnet retries
    # those calls (retry_transient) and reports whatever is not transient itself
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # "Started monitoring..." per trial
    logging.getLogger("mlflow.pyfunc").setLevel(logging.WARNING)  # "Validating input example..." per checkpoint

    if store.artifact_root is not None or store.optuna_storage.startswith("sqlite:"):
        store.root.mkdir(parents=True, exist_ok=True)
    # every call names the store (this client, tracking_uri=...): MLflow's process-wide URI,
    # and the MLFLOW_TRACKING_URI it would export, stay the user's
    # the first client on a fresh database creates MLflow's schema
    with schema_lock(store, store.tracking_uri):
        return retry_schema_race(lambda: MlflowClient(tracking_uri=store.tracking_uri,
                                                      registry_uri=store.tracking_uri))


@contextmanager
def schema_lock(store: Store, url: str):
    """Local workers create (or migrate) an embedded SQLite database one at a time: SQLite
    migrations are not transactional, and two at once leave it half-built. Server
    databases serialise that themselves (see :func:`retry_schema_race`)."""
    if not url.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    store.root.mkdir(parents=True, exist_ok=True)
    with FileLock(store.root / ".schema.lock"):
        yield


def ensure_experiment(client, store: Store, name: str) -> str:
    """The id of experiment ``name``, created (artifacts under the store) if new.

    Two workers creating the same experiment at once both get its id. The artifact folder
    is named after the experiment but always inside the store (``--experiment ../x``
    writes nothing outside it).
    """
    from mlflow.exceptions import MlflowException

    from bnet.tracking.runs import retry_transient

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    location = None
    if store.artifact_root is not None:
        store.artifact_root.mkdir(parents=True, exist_ok=True)
        location = artifact_folder(store.artifact_root, name).as_uri()
    try:
        return retry_transient(lambda: client.create_experiment(name, artifact_location=location))
    except MlflowException:
        experiment = client.get_experiment_by_name(name)  # another worker created it first
        if experiment is None:
            raise
        return experiment.experiment_id


def artifact_folder(root: Path, experiment: str) -> Path:
    """``root/<experiment as a folder name>``: separators and dot-runs cannot climb out."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    folder = (root / safe).resolve()
    if root.resolve() not in folder.parents:
        raise TrackingError(f"experiment name '{experiment}' cannot be an artifact folder inside {root}")
    return folder


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
