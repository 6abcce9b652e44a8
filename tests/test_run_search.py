"""bnet's run searches as SQL on MLflow's tables answer exactly what MLflow's search_runs does.

A store of trial and parent runs, pruned and deleted ones, other families, studies and an
experiment with better values, NaN and -inf metrics; every search bnet makes (ordered by a
metric either way, by start time, existence with =, != and LIKE conditions) is run through
the SQL statement and through MLflow's own search, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile

import pytest

import bnet
from bnet.tracking import conventions as tags
from bnet.tracking import run_search
from bnet.tracking.query import trial_conditions
from bnet.tracking.run_search import RunSearch, TagCondition, find_runs
from bnet.tracking.store import Store, connect, ensure_experiment

START_MS = 1_700_000_000_000


def fill(store: Store) -> str:
    """The experiment's id; runs as bnet writes them, with distinct start times."""
    client = connect(store)
    experiment = ensure_experiment(client, store, "searched")
    elsewhere = ensure_experiment(client, store, "elsewhere")
    clock = iter(range(START_MS, START_MS + 10**6, 1000))

    def run(experiment_id, status="FINISHED", metric=None, **run_tags):
        created = client.create_run(experiment_id, start_time=next(clock), tags=run_tags)
        if metric is not None:
            client.log_metric(created.info.run_id, "best_val_loss", metric)
        client.set_terminated(created.info.run_id, status)
        return created.info.run_id

    trial = {tags.TAG_ROLE: tags.ROLE_TRIAL, tags.TAG_OBJECTIVE: "best_val_loss", tags.TAG_DIRECTION: "minimize"}
    for i, loss in enumerate([0.5, 0.2, 0.9, 0.2, 0.4, 0.7]):
        run(experiment, metric=loss, **trial, **{tags.TAG_FAMILY: "ae", tags.TAG_STUDY: f"s{i % 2}",
                                                 tags.TAG_CONFIG_HASH: f"c{i % 3}", tags.TAG_DATA_HASH: "d1"})
    run(experiment, metric=0.3, **trial, **{tags.TAG_FAMILY: "decoder", tags.TAG_STUDY: "s0",
                                            tags.TAG_OBJECTIVES: "minimize best_val_loss, maximize val_r2"})
    run(experiment, status="KILLED", metric=0.01, **trial, **{tags.TAG_FAMILY: "ae", tags.TAG_STUDY: "s0"})
    run(experiment, metric=0.05, **{tags.TAG_ROLE: "study", tags.TAG_FAMILY: "ae", tags.TAG_STUDY: "s0"})
    run(experiment, metric=math.nan, **trial, **{tags.TAG_FAMILY: "ae", tags.TAG_STUDY: "s1"})
    run(experiment, metric=-math.inf, **trial, **{tags.TAG_FAMILY: "ae", tags.TAG_STUDY: "s1"})
    run(experiment, **trial, **{tags.TAG_FAMILY: "ae", tags.TAG_STUDY: "s1"})  # no metric
    client.delete_run(run(experiment, metric=0.02, **trial, **{tags.TAG_FAMILY: "ae", tags.TAG_STUDY: "s0"}))
    run(elsewhere, metric=0.001, **trial, **{tags.TAG_FAMILY: "ae", tags.TAG_STUDY: "s0"})
    return experiment


def searches(experiment: str) -> list[RunSearch]:
    ae = trial_conditions("ae")
    objective = TagCondition(tags.TAG_OBJECTIVE, "best_val_loss")
    return [
        RunSearch(experiment, ae, "best_val_loss"),
        RunSearch(experiment, ae, "best_val_loss", ascending=False),
        RunSearch(experiment, trial_conditions(study="s0"), "best_val_loss"),
        RunSearch(experiment, trial_conditions("ae", "s1"), "best_val_loss"),
        RunSearch(experiment, trial_conditions(extra={tags.TAG_CONFIG_HASH: "c1"})),
        RunSearch(experiment, trial_conditions(extra={tags.TAG_DATA_HASH: "d1"}), ascending=False),
        RunSearch(experiment, ae + (TagCondition(tags.TAG_OBJECTIVE, "val_r2", "!="),)),
        RunSearch(experiment, trial_conditions() + (TagCondition(tags.TAG_FAMILY, "ae", "!="),)),
        RunSearch(experiment, trial_conditions() + (TagCondition(tags.TAG_OBJECTIVES, "%best_val_loss%", "LIKE"),)),
        RunSearch(experiment, trial_conditions("ae", "nowhere") + (objective,)),
        RunSearch(experiment, ae + (objective,), any_order=True),
    ]


def compare(store: Store, experiment: str, monkeypatch) -> None:
    client = connect(store)
    for search in searches(experiment):
        through_sql = [run.info.run_id for run in find_runs(client, store, search, page_size=2)]
        with monkeypatch.context() as patched:
            patched.setattr(run_search, "is_database", lambda store: False)
            ordered = dataclasses.replace(search, any_order=False)
            through_mlflow = [run.info.run_id for run in find_runs(client, store, ordered, page_size=2)]
        if search.any_order:  # one page of whichever runs match
            assert set(through_sql) <= set(through_mlflow), search
            assert len(through_sql) == min(2, len(through_mlflow)), search
        else:
            assert through_sql == through_mlflow, search


def test_sql_searches_answer_what_mlflow_does_on_sqlite(tmp_path, monkeypatch):
    store = bnet.resolve_store(tmp_path / "store")
    experiment = fill(store)
    compare(store, experiment, monkeypatch)
    best = bnet.best_runs("searched", family="ae", top=2, store=store)
    assert [r.metrics["best_val_loss"] for r in best] == [0.2, 0.2]
    assert best[0].run_id != best[1].run_id
    import sqlite3

    with sqlite3.connect(store.root / "mlflow.db") as db:
        indexes = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"bnet_latest_metrics_key_value", "bnet_tag_study", "bnet_tag_config_hash"} <= indexes


@pytest.mark.slow
@pytest.mark.postgres
def test_sql_searches_answer_what_mlflow_does_on_postgresql(tmp_path, monkeypatch):
    from bnet.tracking.local_postgres import LocalPostgres, postgres_binaries

    if postgres_binaries() is None:
        pytest.skip("no PostgreSQL server installed (apt-get install postgresql; .ci/run does)")
    root = tempfile.mkdtemp(prefix="bnet-pg-")  # the postgres user cannot enter pytest's folders
    server = LocalPostgres(root).start()
    try:
        store = bnet.resolve_store(tmp_path / "store", tracking_uri=server.create_database("searched"))
        compare(store, fill(store), monkeypatch)
    finally:
        run_search._engine.cache_clear()  # its pool holds connections to the server
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
