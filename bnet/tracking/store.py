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
        artifact_root: where new experiments keep artifacts, when the tracking store is
            the embedded one (a tracking server decides for itself otherwise).
    """

    root: Path
    tracking_uri: str
    optuna_storage: str
    artifact_root: Path | None


def resolve_store(
    store: str | Path | None = None, tracking_uri: str | None = None, storage: str | None = None
) -> Store:
    root = Path(store or os.environ.get("BNET_STORE") or DEFAULT_STORE).resolve()
    tracking_uri = tracking_uri or os.environ.get("BNET_TRACKING_URI")
    artifact_root = None
    if not tracking_uri:
        tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
        artifact_root = root / "artifacts"
    storage = storage or os.environ.get("BNET_OPTUNA_STORAGE") or f"sqlite:///{root / 'optuna.db'}"
    return Store(root, tracking_uri, storage, artifact_root)


def connect(store: Store):
    """An MlflowClient on the store (creating the folder for embedded stores)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import logging

    import mlflow
    from mlflow.tracking import MlflowClient

    # "Creating initial MLflow database tables..." on every new store is noise in a CLI.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)

    if store.tracking_uri.startswith("sqlite:") or store.optuna_storage.startswith("sqlite:"):
        store.root.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(store.tracking_uri)
    mlflow.set_registry_uri(store.tracking_uri)
    return MlflowClient(tracking_uri=store.tracking_uri, registry_uri=store.tracking_uri)


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
