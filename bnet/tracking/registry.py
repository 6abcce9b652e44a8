"""The model registry: register a run's checkpoint, load a model back by URI.

A model version's source is the run's ``checkpoint/`` folder, an MLflow Model
(:mod:`bnet.tracking.pyfunc`); loading downloads its ``artifacts/model.pt`` (``model.pt`` in
runs logged before checkpoints were MLflow Models) and rebuilds the model through the model
registry of :mod:`bnet.models` with ``torch.load(weights_only=True)`` — no pickled code runs.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass

from bnet.errors import TrackingError
from bnet.tracking import conventions as tags
from bnet.tracking.query import RunSummary, get_run
from bnet.tracking.store import Store, connect, resolve_store

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class RegisteredVersion:
    name: str
    version: str
    alias: str | None
    run_id: str
    source: str


def register_run(run: RunSummary, name: str, alias: str | None = "champion",
                 store: Store | None = None) -> RegisteredVersion:
    """Register ``run``'s checkpoint as a new version of ``name`` and point ``alias`` at it."""
    from mlflow.exceptions import MlflowException

    client = connect(store or resolve_store())
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, tags={tags.TAG_FAMILY: run.family or ""},
            description=f"bnet {run.family} models (registered by `bnet register`)",
        )
    # a trial answered by another study's fit registers that fit's checkpoint
    holder = run if run.artifact_run_id == run.run_id else get_run(run.artifact_run_id, store)
    source = f"{holder.artifact_uri}/{tags.MODEL_DIR}"
    version = client.create_model_version(
        name, source=source, run_id=run.run_id,
        tags={k: v for k, v in run.tags.items() if k.startswith("bnet.")},
    )
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return RegisteredVersion(name, str(version.version), alias, run.run_id, source)


def resolve_model_uri(uri: str, store: Store | None = None) -> RunSummary:
    """The run behind a run id, ``runs:/ID``, ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    from mlflow.exceptions import MlflowException

    store = store or resolve_store()
    client = connect(store)
    if uri.startswith("models:/"):
        reference = uri[len("models:/"):]
        try:
            if "@" in reference:
                name, alias = reference.split("@", 1)
                version = client.get_model_version_by_alias(name, alias)
            elif "/" in reference:
                name, number = reference.split("/", 1)
                version = client.get_model_version(name, number)
            else:
                raise TrackingError(f"'{uri}': use models:/NAME@ALIAS or models:/NAME/VERSION")
        except MlflowException as err:
            raise TrackingError(f"'{uri}' does not resolve in the model registry ({err.message})") from None
        return get_run(version.run_id, store)
    run_id = uri[len("runs:/"):].split("/", 1)[0] if uri.startswith("runs:/") else uri
    if not _RUN_ID.match(run_id):
        raise TrackingError(
            f"'{uri}' is not a run id, runs:/RUN_ID, models:/NAME@ALIAS or models:/NAME/VERSION"
        )
    return get_run(run_id, store)


def download_checkpoint(run: RunSummary, destination: str, store: Store | None = None) -> str:
    path = (download_artifact(run, tags.CHECKPOINT_PATH, destination, store)
            or download_artifact(run, tags.LEGACY_CHECKPOINT_PATH, destination, store))
    if path is None:
        raise TrackingError(f"run {run.run_id} has no {tags.CHECKPOINT_PATH} artifact")
    return path


def load_model(uri: str, store: Store | None = None):
    """Rebuild the model of a run id, ``runs:/ID`` or ``models:/NAME@ALIAS`` (eval mode, CPU).

    The returned module carries ``run`` (the :class:`RunSummary` it came from).
    """
    from bnet.models.checkpoint import load_checkpoint

    store = store or resolve_store()
    run = resolve_model_uri(uri, store)
    with tempfile.TemporaryDirectory() as tmp:
        model = load_checkpoint(download_checkpoint(run, tmp, store))
    model.run = run
    return model


def resolve_upstream(reference: str, family: str, experiment: str | None = None,
                     data_hash: str | None = None, store: Store | None = None) -> RunSummary:
    """The finished ``family`` run that ``reference`` names: ``best`` (the best run of
    ``experiment`` fitted to the data with ``data_hash``, by the metric its study
    optimised), a run id, ``runs:/ID`` or ``models:/NAME@ALIAS``."""
    from bnet.tracking.query import best_runs

    store = store or resolve_store()
    if reference == "best":
        if not experiment:
            raise TrackingError(f"--{family} best needs --{family}-experiment NAME to search")
        runs = best_runs(experiment, family, 1, store=store, data_hash=data_hash)
        if not runs:
            raise TrackingError(f"experiment '{experiment}' has no finished {family} runs with their objective metric")
        return runs[0]
    run = resolve_model_uri(reference, store)
    if run.family != family:
        raise TrackingError(
            f"'{reference}' resolves to run {run.run_id}, a {run.family or 'non-bnet'} run, not {family}"
        )
    if run.status != "FINISHED":
        raise TrackingError(f"'{reference}' resolves to run {run.run_id}, which is {run.status}, not FINISHED")
    return run


def download_artifact(run: RunSummary, path: str, destination: str, store: Store | None = None) -> str | None:
    """A run's artifact downloaded to ``destination``, or None if the run has no such artifact
    (a trial answered by another study's fit reads that fit's artifacts)."""
    import mlflow

    store = store or resolve_store()
    client = connect(store)
    folder = path.rsplit("/", 1)[0] if "/" in path else None
    if path not in {a.path for a in client.list_artifacts(run.artifact_run_id, folder)}:
        return None
    return mlflow.artifacts.download_artifacts(run_id=run.artifact_run_id, artifact_path=path,
                                               dst_path=destination, tracking_uri=store.tracking_uri)
