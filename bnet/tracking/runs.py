"""Writing runs: params, per-epoch metrics, artifacts, dataset inputs.

Everything goes through an explicit ``MlflowClient`` and run id (no fluent "active run"),
so several studies or workers in one process cannot log into each other's runs, and every
epoch costs one batched call.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import warnings
from functools import cache
from pathlib import Path
from typing import Any, Callable, TypeVar

from bnet.tracking import conventions as tags

MAX_PARAM_LENGTH = 6000
T = TypeVar("T")


def _now_ms() -> int:
    return int(time.time() * 1000)


# what a store says while another local worker writes (SQLite) or while a database server
# restarts or drops the connection (PostgreSQL): worth waiting for, not failing a trial over
TRANSIENT = ("database is locked", "server closed the connection", "Connection refused",
             "terminating connection", "could not connect", "connection is closed",
             "the database system is starting up", "the database system is shutting down",
             "connection to server", "SSL SYSCALL error", "consuming input failed")


def is_transient(err: BaseException) -> bool:
    chain = error_chain(err)
    return any(sign in chain for sign in TRANSIENT)


def retry_transient(call: Callable[[], T], seconds: float = 120.0) -> T:
    """Run ``call``, retrying while the store is locked by another local worker's write
    (SQLite serialises writers; its own busy wait is 5 s in MLflow) or its database server
    is out of reach for a while (a restart)."""
    import random

    deadline = time.monotonic() + seconds
    delay = 0.05
    while True:
        try:
            return call()
        except Exception as err:
            if not is_transient(err) or time.monotonic() > deadline:
                raise
            time.sleep(delay + random.random() * delay)
            delay = min(delay * 2, 2.0)


def error_chain(err: BaseException | None) -> str:
    texts = []
    while err is not None and len(texts) < 5:
        texts.append(str(err))
        err = err.__cause__ or err.__context__
    return " ".join(texts)


class RunLogger:
    """Logs into one MLflow run."""

    def __init__(self, client, run_id: str):
        self.client = client
        self.run_id = run_id

    def set_tags(self, values: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        retry_transient(lambda: self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in values.items()]))

    def log_params(self, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, _param_text(v)) for k, v in sorted(values.items())]
        for start in range(0, len(params), 100):  # MLflow's per-batch limit
            retry_transient(lambda: self.client.log_batch(self.run_id, params=params[start : start + 100]))

    def log_metrics(self, values: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        stamp = _now_ms()
        metrics = [Metric(k, float(v), stamp, step) for k, v in values.items() if v is not None]
        if metrics:
            retry_transient(lambda: self.client.log_batch(self.run_id, metrics=metrics))

    def log_file(self, path: str | Path, artifact_dir: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_dir)

    def log_checkpoint(self, model, metadata: dict[str, Any]) -> None:
        """The model as an MLflow Model in ``checkpoint/`` (bnet.tracking.pyfunc): its state dict
        and rebuilding config are ``checkpoint/artifacts/model.pt``."""
        from bnet.models.checkpoint import save_checkpoint
        from bnet.tracking.pyfunc import save_model

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = save_checkpoint(Path(tmp) / "model.pt", model, {"run_id": self.run_id, **metadata})
            folder = Path(tmp) / tags.MODEL_DIR
            try:
                saved = save_model(folder, checkpoint)
            except Exception as err:  # the fit is good whatever MLflow's model format makes of it
                warnings.warn(f"run {self.run_id}: the checkpoint is saved, but not as an MLflow Model "
                              f"({type(err).__name__}: {err})")
                self.set_tags({tags.TAG_PYFUNC_ERROR: f"{type(err).__name__}: {err}"[:5000]})
                shutil.rmtree(folder, ignore_errors=True)
                saved = False
            if not saved:
                (folder / "artifacts").mkdir(parents=True)
                checkpoint.rename(folder / "artifacts" / checkpoint.name)
            self.client.log_artifacts(self.run_id, str(folder), tags.MODEL_DIR)

    def log_text(self, text: str, name: str) -> None:
        """A text artifact (an error's traceback, a summary): any password in a URL shown as ***."""
        from bnet.tracking.secrets import redact

        retry_transient(lambda: self.client.log_text(self.run_id, redact(text), name))

    def log_figure(self, figure, name: str) -> None:
        """Save a matplotlib figure as ``plots/<name>.png`` and close it."""
        import matplotlib.pyplot as plt

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.png"
            figure.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(figure)
            self.log_file(path, tags.PLOTS_DIR)

    def log_dataset(self, path: Path, name: str, digest: str, context: str = "training") -> None:
        """Record the session file as the run's input dataset, with its digest."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import Dataset, DatasetInput, InputTag

        with warnings.catch_warnings():
            # MLflow registers the local-file source class twice and warns that it is ambiguous.
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(str(path))
        dataset = MetaDataset(source=source, name=name, digest=digest)
        context_tag = InputTag("mlflow.data.context", context)
        self.client.log_inputs(
            self.run_id, datasets=[DatasetInput(Dataset(**dataset.to_dict()), tags=[context_tag])]
        )

    def terminate(self, status: str) -> None:
        retry_transient(lambda: self.client.set_terminated(self.run_id, status=status))


def _param_text(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        return "unknown"


@cache
def provenance() -> dict[str, str]:
    """What made a run: bnet's version, and the commit of the project the command runs in (the
    working directory's git repository, MLflow's ``mlflow.source.git.commit``) where there is one."""
    import bnet

    found = {tags.TAG_VERSION: bnet.__version__}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git on this machine
        return found
    if commit.returncode == 0:
        found[tags.MLFLOW_GIT_COMMIT] = commit.stdout.strip()
    return found


def create_run(client, experiment_id: str, run_name: str, run_tags: dict[str, Any],
               parent_run_id: str | None = None) -> RunLogger:
    all_tags = {tags.MLFLOW_RUN_NAME: run_name, "mlflow.user": _user(), "mlflow.source.type": "LOCAL",
                "mlflow.source.name": "bnet", **provenance(), **run_tags}
    if parent_run_id:
        all_tags[tags.MLFLOW_PARENT] = parent_run_id
    run = retry_transient(lambda: client.create_run(experiment_id, tags={k: str(v) for k, v in all_tags.items()},
                                                 run_name=run_name))
    return RunLogger(client, run.info.run_id)
