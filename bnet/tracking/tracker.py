"""The MLflow side of a study: its experiment, its runs, and closing them however they end."""

from __future__ import annotations

from typing import Any

from bnet.tracking import conventions as tags
from bnet.tracking.query import RunSummary, find_config_run
from bnet.tracking.runs import RunLogger, create_run, retry_transient
from bnet.tracking.secrets import redact
from bnet.tracking.store import Store, connect, ensure_experiment

MAX_TAG_LENGTH = 5000


class Tracker:
    """One store's runs, for the study engine (which never holds an MLflow client itself)."""

    def __init__(self, store: Store):
        self.store = store
        self.client = connect(store)

    def experiment(self, name: str) -> str:
        return ensure_experiment(self.client, self.store, name)

    def create_run(self, experiment_id: str, run_name: str, run_tags: dict[str, Any],
                   parent_run_id: str | None = None) -> RunLogger:
        return create_run(self.client, experiment_id, run_name, run_tags, parent_run_id)

    def run(self, run_id: str) -> RunLogger:
        return RunLogger(self.client, run_id)

    def status(self, run_id: str) -> str:
        return retry_transient(lambda: self.client.get_run(run_id)).info.status

    def metrics(self, run_id: str) -> dict[str, float]:
        """A run's latest value of each metric."""
        return dict(retry_transient(lambda: self.client.get_run(run_id)).data.metrics)

    def reopen(self, run_id: str) -> RunLogger:
        retry_transient(lambda: self.client.update_run(run_id, status="RUNNING"))
        return self.run(run_id)

    def close(self, run_id: str, status: str, trial_state: str, reason: str | None = None) -> None:
        """End a run as FINISHED, KILLED or FAILED, with the trial's state and why."""
        values = {tags.TAG_TRIAL_STATE: trial_state}
        if reason:
            values[tags.TAG_ERROR] = redact(reason)[:MAX_TAG_LENGTH]
        run = self.run(run_id)
        run.set_tags(values)
        run.terminate(status)

    def close_if_running(self, run_id: str, status: str, trial_state: str, reason: str) -> bool:
        """Close a run left RUNNING by a worker that is gone; False if it had ended."""
        if self.status(run_id) != "RUNNING":
            return False
        self.close(run_id, status, trial_state, reason)
        return True

    def find_config(self, experiment_id: str, config_hash: str) -> RunSummary | None:
        return find_config_run(experiment_id, config_hash, self.store)

    def record_reuse(self, experiment_id: str, fitted: RunSummary, run_name: str, run_tags: dict[str, Any],
                     parent_run_id: str) -> str:
        """A finished run in another study that ``fitted`` answers (same fit identity): its
        params, final metrics and model tags, linked to the run that holds the model."""
        carried = {k: v for k, v in fitted.tags.items()
                   if k in (tags.TAG_CONFIG_HASH, tags.TAG_MODEL_CLASS, tags.TAG_MODEL_TYPE, tags.TAG_SESSION_HASHES,
                            tags.TAG_N_SESSIONS, tags.TAG_TRIAL_STATE)}
        run = self.create_run(experiment_id, run_name,
                              {**carried, **run_tags, tags.TAG_REUSED_RUN: fitted.artifact_run_id}, parent_run_id)
        run.log_params(fitted.params)
        run.log_metrics(fitted.metrics)
        run.terminate("FINISHED")
        return run.run_id
