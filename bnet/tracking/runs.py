"""Writing runs: params, per-epoch metrics, artifacts, dataset inputs.

Everything goes through an explicit ``MlflowClient`` and run id (no fluent "active run"),
so several studies or workers in one process cannot log into each other's runs, and every
epoch costs one batched call.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

from bnet.tracking import conventions as tags

MAX_PARAM_LENGTH = 6000


def _now_ms() -> int:
    return int(time.time() * 1000)


class RunLogger:
    """Logs into one MLflow run."""

    def __init__(self, client, run_id: str):
        self.client = client
        self.run_id = run_id

    def set_tags(self, values: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in values.items()])

    def log_params(self, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, _param_text(v)) for k, v in sorted(values.items())]
        for start in range(0, len(params), 100):  # MLflow's per-batch limit
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log_metrics(self, values: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        stamp = _now_ms()
        metrics = [Metric(k, float(v), stamp, step) for k, v in values.items() if v is not None]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_file(self, path: str | Path, artifact_dir: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_dir)

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
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():
            # MLflow registers the local-file source class twice and warns that it is ambiguous.
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(str(path))
        dataset = MetaDataset(source=source, name=name, digest=digest)
        context_tag = InputTag("mlflow.data.context", context)
        self.client.log_inputs(
            self.run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[context_tag])]
        )

    def terminate(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


def _param_text(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        return "unknown"


def create_run(client, experiment_id: str, run_name: str, run_tags: dict[str, Any],
               parent_run_id: str | None = None) -> RunLogger:
    all_tags = {tags.MLFLOW_RUN_NAME: run_name, "mlflow.user": _user(), "mlflow.source.type": "LOCAL",
                "mlflow.source.name": "bnet", **run_tags}
    if parent_run_id:
        all_tags[tags.MLFLOW_PARENT] = parent_run_id
    run = client.create_run(experiment_id, tags={k: str(v) for k, v in all_tags.items()},
                            run_name=run_name)
    return RunLogger(client, run.info.run_id)


def find_runs(client, experiment_ids: Iterable[str], filter_string: str, max_results: int = 1000,
              order_by: list[str] | None = None):
    return client.search_runs(
        list(experiment_ids), filter_string=filter_string, max_results=max_results,
        order_by=order_by,
    )
