"""Options shared by several commands."""

from __future__ import annotations

import click

store_option = click.option(
    "--store", type=click.Path(file_okay=False), default=None,
    help="Store folder with mlflow.db, optuna.db and artifacts/ [env BNET_STORE; default ./bnet-store].",
)
tracking_uri_option = click.option(
    "--tracking-uri", default=None,
    help="MLflow tracking URI (a server or database) [env BNET_TRACKING_URI; default the store's mlflow.db].",
)


def resolve(store, tracking_uri, storage=None):
    from bnet.tracking.store import resolve_store

    return resolve_store(store, tracking_uri, storage)


def runs_link(experiment_id: str, port: int = 5000) -> str:
    """Where the runs table of an experiment is, once ``bnet ui`` serves the store."""
    return f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
