"""The run searches bnet makes, as one SQL statement where the store is a database.

MLflow's ``search_runs`` joins a subquery per tag filter and orders by a metric through a
materialised join of ``latest_metrics``: on a SQLite store of 100,000 finished trial runs
"the best trial" took 1.5 s a call after ANALYZE and minutes before it, and bnet asks three
such questions for it. Where the tracking URI is a database (SQLite, PostgreSQL), the same
questions go to MLflow's own tables (``runs``, ``tags``, ``latest_metrics``, whose columns
MLflow has kept since 1.x) as one statement each, driven from the rarest thing asked for: a
metric's values in order through an index on (key, value), or a tag's rows (partial indexes
on the few tags whose values single out a handful of runs); the other conditions are
primary-key probes. bnet adds those indexes to the database the first time it searches it
(a few seconds on a large existing store, once; a store it may not alter is searched
without them). Only the ids come from SQL; the runs are then read through MLflow. A tracking
server (``http://``) is asked through ``search_runs`` with the same conditions.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from bnet.tracking import conventions as tags
from bnet.tracking.store import Store

FINITE_FLOOR = -1e308
"""Runs whose metric is not above this (-inf) are left out (``> -1e308`` in MLflow's filter)."""
RARE_TAGS = (tags.TAG_STUDY, tags.TAG_DATA_HASH, tags.TAG_CONFIG_HASH)
"""Tags whose value picks out few runs: a search they drive reads those runs alone."""
SEARCH_INDEXES = ["CREATE INDEX IF NOT EXISTS bnet_latest_metrics_key_value ON latest_metrics (key, value)"] + [
    f"CREATE INDEX IF NOT EXISTS bnet_tag_{key.split('.')[-1]} ON tags (value, run_uuid) WHERE key = '{key}'"
    for key in RARE_TAGS]
POSTGRESQL_TAG_STATISTICS = "CREATE STATISTICS IF NOT EXISTS bnet_tags_key_value (mcv) ON key, value FROM tags"
"""Without statistics of key and value together, PostgreSQL's planner takes "every trial"
for a rare tag and sorts all runs instead of walking the metric's index."""
POSTGRESQL_STATISTICS = ["ANALYZE runs", "ANALYZE tags", "ANALYZE latest_metrics"]
"""Run once, when bnet adds its indexes to a PostgreSQL store: a store bulk-loaded or
migrated moments ago has no statistics until autovacuum's next pass, and without them the
planner probed every tag row per run (45 s at 10,000 runs)."""


def quote(value: str) -> str:
    """A string literal of MLflow's filter language."""
    return "'" + str(value).replace("'", "\\'") + "'"


def sql_literal(value: str) -> str:
    """A string literal of SQL (tag keys are inlined, so partial indexes on them apply)."""
    return "'" + str(value).replace("'", "''") + "'"


@dataclass(frozen=True)
class TagCondition:
    """``tags.key op value`` (op ``=``, ``!=`` or ``LIKE``): a run without the tag never matches."""

    key: str
    value: str
    op: str = "="

    def mlflow_filter(self) -> str:
        return f"tags.`{self.key}` {self.op} {quote(self.value)}"

    def sql(self, alias: str, parameter: str) -> str:
        """The condition on the tags row ``alias``, its value bound to ``:parameter``."""
        compare = {"=": f"= :{parameter}", "LIKE": f"LIKE :{parameter}",
                   "!=": f"<> :{parameter}"}[self.op]
        return f"{alias}.key = {sql_literal(self.key)} AND {alias}.value {compare}"


def filter_string(conditions: tuple[TagCondition, ...]) -> str:
    """MLflow's filter of finished runs meeting every condition."""
    return " and ".join(["attributes.status = 'FINISHED'"] + [c.mlflow_filter() for c in conditions])


@dataclass(frozen=True)
class RunSearch:
    """Finished, active runs of one experiment meeting every tag condition, in order.

    Attributes:
        experiment_id: the MLflow experiment.
        conditions: tag conditions, all of which must hold. Without a metric, the last one
            drives the search: the rarest goes last.
        metric: order by this metric's latest value (runs without a finite one left out),
            ties by start time; without one, by start time.
        ascending: lowest metric (or, without one, earliest start) first.
        any_order: no order at all, for a search that asks whether a run exists (it stops
            at the first one found); it returns one page of runs at most.
    """

    experiment_id: str
    conditions: tuple[TagCondition, ...]
    metric: str | None = None
    ascending: bool = True
    any_order: bool = False

    def with_conditions(self, *conditions: TagCondition) -> RunSearch:
        return RunSearch(self.experiment_id, self.conditions + conditions, self.metric, self.ascending,
                         self.any_order)

    @property
    def _direction(self) -> str:
        return "ASC" if self.ascending else "DESC"

    def mlflow_filter(self) -> str:
        metric = f" and metrics.`{self.metric}` > -1e308" if self.metric else ""
        return filter_string(self.conditions) + metric

    def mlflow_order(self) -> list[str] | None:
        if self.metric:
            return [f"metrics.`{self.metric}` {self._direction}", "attributes.start_time ASC"]
        return None if self.any_order else [f"attributes.start_time {self._direction}"]

    def _driving_condition(self) -> TagCondition | None:
        """The condition the statement starts from: a rare tag's value where one is asked
        for; else the metric's order (None) or, without a metric, the last condition."""
        rare = [c for c in self.conditions if c.op == "=" and c.key in RARE_TAGS]
        if rare:
            return rare[0]
        return None if self.metric else self.conditions[-1]

    def sql(self, dialect: str) -> tuple[str, dict]:
        """The statement selecting the runs' ids in ``dialect`` (``sqlite``, ``postgresql``),
        with ``:limit`` and ``:offset`` to bind.

        CROSS JOIN keeps SQLite's join order, and a subquery with OFFSET 0 PostgreSQL's: their
        planners, even with statistics, would start from a tag that every trial carries.
        """
        params: dict = {"experiment": int(self.experiment_id)}
        driving = self._driving_condition()
        conditions = [c for c in self.conditions if c is not driving]
        if driving is None:
            source, clauses = "latest_metrics m CROSS JOIN runs r", []
        else:
            fence = " OFFSET 0" if dialect == "postgresql" else ""
            source = (f"(SELECT d.run_uuid FROM tags d WHERE {driving.sql('d', 'driving')}{fence}) d "
                      "CROSS JOIN runs r" + (" CROSS JOIN latest_metrics m" if self.metric else ""))
            clauses = ["r.run_uuid = d.run_uuid"]
            params["driving"] = driving.value
        if self.metric:
            clauses += ["m.key = :metric", "m.is_nan = :not_nan", "m.value > :floor", "m.run_uuid = r.run_uuid"]
            params.update(metric=self.metric, not_nan=False, floor=FINITE_FLOOR)
            order = f"m.value {self._direction}, r.start_time ASC, r.run_uuid"
        else:
            order = None if self.any_order else f"r.start_time {self._direction}, r.run_uuid"
        clauses += ["r.experiment_id = :experiment", "r.status = 'FINISHED'", "r.lifecycle_stage = 'active'"]
        for i, condition in enumerate(conditions):
            params[f"value{i}"] = condition.value
            clauses.append(f"EXISTS (SELECT 1 FROM tags t{i} WHERE t{i}.run_uuid = r.run_uuid AND "
                           f"{condition.sql(f't{i}', f'value{i}')})")
        ordering = f" ORDER BY {order}" if order else ""
        return f"SELECT r.run_uuid FROM {source} WHERE {' AND '.join(clauses)}{ordering} LIMIT :limit OFFSET :offset", params


@functools.lru_cache(maxsize=4)
def _engine(tracking_uri: str):
    """An engine on the store's database, with bnet's search indexes where it may add them."""
    from sqlalchemy import create_engine, text

    # pre-ping: a pooled connection a database restart cut is replaced, not reused
    engine = create_engine(tracking_uri, pool_pre_ping=True)
    postgresql = engine.dialect.name == "postgresql"
    new = postgresql and not _has_search_indexes(engine)
    postgresql_only = [POSTGRESQL_TAG_STATISTICS] + (POSTGRESQL_STATISTICS if new else []) if postgresql else []
    for statement in SEARCH_INDEXES + postgresql_only:
        try:
            with engine.begin() as connection:
                connection.execute(text(statement))
        except Exception as error:  # another worker building it, a read-only user: search without
            logging.getLogger(__name__).debug("no search index (%s): %s", statement, error)
    return engine


def _has_search_indexes(engine) -> bool:
    from sqlalchemy import text

    with engine.connect() as connection:
        return connection.execute(text("SELECT 1 FROM pg_indexes WHERE indexname = "
                                       "'bnet_latest_metrics_key_value'")).first() is not None


def is_database(store: Store) -> bool:
    """SQLite and PostgreSQL, whose comparisons are case-sensitive as MLflow's are (MLflow
    forces that on MySQL and SQL Server, which bnet leaves to MLflow's search)."""
    return store.tracking_uri.startswith(("sqlite:", "postgresql"))


def find_runs(client, store: Store, search: RunSearch, page_size: int = 10) -> Iterator:
    """The matching runs (MLflow ``Run`` objects) in order, read a page at a time as the
    caller iterates."""
    if not is_database(store):
        token = None
        while True:
            page = client.search_runs([search.experiment_id], filter_string=search.mlflow_filter(),
                                      order_by=search.mlflow_order(), max_results=page_size, page_token=token)
            yield from page
            token = page.token
            if not token or search.any_order:
                return
    from sqlalchemy import text

    from bnet.tracking.runs import retry_transient

    statement, params = search.sql(_engine(store.tracking_uri).dialect.name)

    def page(offset: int) -> list[str]:
        with _engine(store.tracking_uri).connect() as connection:
            return [row[0] for row in connection.execute(text(statement), {**params, "limit": page_size,
                                                                          "offset": offset})]

    offset = 0
    while True:
        ids = retry_transient(lambda: page(offset))
        yield from (client.get_run(run_id) for run_id in ids)
        if len(ids) < page_size or search.any_order:  # unordered pages could overlap
            return
        offset += page_size


def first_run(client, store: Store, search: RunSearch):
    """The first matching run, or None."""
    return next(find_runs(client, store, search, page_size=1), None)
