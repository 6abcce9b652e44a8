"""``bnet best`` and ``bnet register``: answers from MLflow queries, never from folders.

Runs are ranked by the metric their study optimised (each run records it), within the
data they were fitted on when ``--data`` names the session file.
"""

from __future__ import annotations

import json

import click

from bnet.cli.options import FamilyCommands, resolve, store_option, tracking_uri_option

data_option = click.option("--data", "data_path", type=click.Path(dir_okay=False), default=None,
                           help="Only runs fitted to this session file (by its digest).")
metric_option = click.option("--metric", default=None,
                             help="Rank by this run metric instead [default the metric the study optimised].")
direction_option = click.option("--direction", type=click.Choice(["minimize", "maximize"]), default=None,
                                help="Which way --metric is better [default the direction its studies optimised "
                                     "it, or its validation counterpart, in].")


def _data_hash(data_path: str | None) -> str | None:
    if data_path is None:
        return None
    from bnet.data.session import open_session

    return open_session(data_path, require=()).data_hash


def _ranked(family, experiment, top, study, metric, direction, data_path, store):
    from bnet.tracking import best_runs
    from bnet.tracking.query import study_objective

    data_hash = _data_hash(data_path)
    if metric is None:
        metric, recorded = study_objective(experiment, family, study, data_hash, store)
        direction = direction or recorded
    # a named metric is ranked the way the studies that optimised it did (best_runs looks it up)
    runs = best_runs(experiment, family, top, study, metric, direction, store, data_hash=data_hash)
    return metric, runs


def _best_command(family: str) -> click.Command:
    @click.command(family, help=f"The best finished {family} runs, ranked by the metric their study optimised.")
    @click.option("--experiment", required=True, help="MLflow experiment.")
    @click.option("--top", default=1, show_default=True, help="How many runs.")
    @click.option("--study", default=None, help="Only this Optuna study's trials.")
    @data_option
    @metric_option
    @direction_option
    @click.option("--json", "as_json", is_flag=True, help="Print a JSON list, best first.")
    @store_option
    @tracking_uri_option
    def command(experiment, top, study, data_path, metric, direction, as_json, store, tracking_uri):
        from bnet.errors import TrackingError

        metric, runs = _ranked(family, experiment, top, study, metric, direction, data_path,
                               resolve(store, tracking_uri))
        if as_json:
            click.echo(json.dumps([r.as_json() for r in runs], indent=2))
            return
        if not runs:
            raise TrackingError(f"experiment '{experiment}' has no finished {family} runs with metric {metric}")
        test_metric = metric.replace("val", "test").replace("best_", "")
        from bnet.tuning.family import get_family

        declared = get_family(family)
        for rank, run in enumerate(runs, 1):
            shown = {k: run.params[k] for k in declared.shown_params if k in run.params}
            click.echo(f"{rank}. run {run.run_id}  {metric} {run.metrics.get(metric):.6g}  "
                       f"{test_metric} {run.metrics.get(test_metric, float('nan')):.6g}  "
                       f"trial {run.tags.get('bnet.trial')} of study {run.tags.get('bnet.study')}  {shown}")
            comparison = declared.trivial(run.metrics)
            if comparison is not None:
                click.echo(f"   {comparison.figure}")
            click.echo(f"   {run.artifact_uri}")
        best_comparison = declared.trivial(runs[0].metrics)
        if best_comparison is not None and best_comparison.warns:
            click.echo(best_comparison.sentence("the best run"))

    return command


def _register_command(family: str) -> click.Command:
    @click.command(family, help=f"Register the best {family} run (or --run) and set an alias.")
    @click.option("--experiment", required=True, help="MLflow experiment to pick the best run from.")
    @click.option("--name", "model_name", required=True, help="Registered model name.")
    @click.option("--alias", default="champion", show_default=True)
    @click.option("--run", "run_id", default=None, help="Register this run instead of the best.")
    @click.option("--study", default=None, help="Pick the best of this Optuna study only.")
    @data_option
    @metric_option
    @direction_option
    @store_option
    @tracking_uri_option
    def command(experiment, model_name, alias, run_id, study, data_path, metric, direction, store, tracking_uri):
        from bnet.errors import TrackingError
        from bnet.tracking import get_run, register_run

        resolved = resolve(store, tracking_uri)
        if run_id:
            run = get_run(run_id, resolved)
            if run.family != family:
                raise TrackingError(f"run {run_id} is a {run.family or 'non-bnet'} run, not {family}")
        else:
            metric, runs = _ranked(family, experiment, 1, study, metric, direction, data_path, resolved)
            if not runs:
                raise TrackingError(f"experiment '{experiment}' has no finished {family} runs to register")
            run = runs[0]
        version = register_run(run, model_name, alias, resolved)
        click.echo(f"registered run {run.run_id} as {version.name} version {version.version}"
                   + (f"; load it with bnet.load_model('models:/{version.name}@{alias}')" if alias else ""))

    return command


@click.group(cls=FamilyCommands, make_command=_best_command)
def best():
    """Show the best finished runs of an experiment."""


@click.group(cls=FamilyCommands, make_command=_register_command)
def register():
    """Register the best run as a model version with an alias."""
