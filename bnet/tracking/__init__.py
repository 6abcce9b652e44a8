"""The only layer that talks to MLflow: run conventions, queries, registry."""

from bnet.tracking.query import RunSummary, best_runs, get_run, trial_filter
from bnet.tracking.registry import (
    RegisteredVersion, download_artifact, load_model, register_run, resolve_model_uri, resolve_upstream,
)
from bnet.tracking.runs import RunLogger, create_run
from bnet.tracking.store import Store, connect, ensure_experiment, resolve_store

__all__ = [
    "RegisteredVersion", "RunLogger", "RunSummary", "Store", "best_runs", "connect",
    "create_run", "download_artifact", "ensure_experiment", "get_run", "load_model", "register_run",
    "resolve_model_uri", "resolve_store", "resolve_upstream", "trial_filter",
]
