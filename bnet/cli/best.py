"""``bnet best`` and ``bnet register``: answers from MLflow queries, never from folders."""

from __future__ import annotations

import json

import click

from bnet.cli.options import resolve, store_option, tracking_uri_option

# each family's ranking metric and direction (what its studies optimise)
FAMILIES = {"ae": ("best_val_loss", "minimize"), "arhmm": ("val_ll_per_step", "maximize"),
            "decoder": ("val_r2", "maximize")}
SHOWN_PARAMS = ("model_type", "n_ae_latents", "learning_rate", "l2_reg", "n_arhmm_states", "n_arhmm_lags",
                "noise_type", "transitions", "kappa", "n_lags", "n_hid_layers", "n_hid_units")


@click.group()
def best():
    """Show the best finished runs of an experiment."""


@click.group()
def register():
    """Register the best run as a model version with an alias."""


def _best_command(family: str) -> click.Command:
    metric_default, direction_default = FAMILIES[family]

    @click.command(family, help=f"The best finished {family} runs, ranked by the study metric.")
    @click.option("--experiment", required=True, help="MLflow experiment.")
    @click.option("--top", default=1, show_default=True, help="How many runs.")
    @click.option("--study", default=None, help="Only this Optuna study's trials.")
    @click.option("--metric", default=metric_default, show_default=True)
    @click.option("--direction", type=click.Choice(["minimize", "maximize"]), default=direction_default, show_default=True)
    @click.option("--json", "as_json", is_flag=True, help="Print a JSON list, best first.")
    @store_option
    @tracking_uri_option
    def command(experiment, top, study, metric, direction, as_json, store, tracking_uri):
        from bnet.errors import TrackingError
        from bnet.tracking import best_runs

        runs = best_runs(experiment, family, top, study, metric, direction, resolve(store, tracking_uri))
        if as_json:
            click.echo(json.dumps([r.as_json() for r in runs], indent=2))
            return
        if not runs:
            raise TrackingError(f"experiment '{experiment}' has no finished {family} runs with metric {metric}")
        test_metric = metric.replace("val", "test").replace("best_", "")
        for rank, run in enumerate(runs, 1):
            shown = {k: run.params[k] for k in SHOWN_PARAMS if k in run.params}
            click.echo(f"{rank}. run {run.run_id}  {metric} {run.metrics.get(metric):.6g}  "
                       f"{test_metric} {run.metrics.get(test_metric, float('nan')):.6g}  "
                       f"trial {run.tags.get('bnet.trial')} of study {run.tags.get('bnet.study')}  {shown}")
            click.echo(f"   {run.artifact_uri}")

    return command


def _register_command(family: str) -> click.Command:
    metric_default, direction = FAMILIES[family]

    @click.command(family, help=f"Register the best {family} run (or --run) and set an alias.")
    @click.option("--experiment", required=True, help="MLflow experiment to pick the best run from.")
    @click.option("--name", "model_name", required=True, help="Registered model name.")
    @click.option("--alias", default="champion", show_default=True)
    @click.option("--run", "run_id", default=None, help="Register this run instead of the best.")
    @click.option("--metric", default=metric_default, show_default=True)
    @store_option
    @tracking_uri_option
    def command(experiment, model_name, alias, run_id, metric, store, tracking_uri):
        from bnet.errors import TrackingError
        from bnet.tracking import best_runs, get_run, register_run

        resolved = resolve(store, tracking_uri)
        if run_id:
            run = get_run(run_id, resolved)
            if run.family != family:
                raise TrackingError(f"run {run_id} is a {run.family or 'non-bnet'} run, not {family}")
        else:
            runs = best_runs(experiment, family, 1, metric=metric, direction=direction, store=resolved)
            if not runs:
                raise TrackingError(f"experiment '{experiment}' has no finished {family} runs to register")
            run = runs[0]
        version = register_run(run, model_name, alias, resolved)
        click.echo(f"registered run {run.run_id} as {version.name} version {version.version}"
                   + (f"; load it with bnet.load_model('models:/{version.name}@{alias}')" if alias else ""))

    return command


for _family in FAMILIES:
    best.add_command(_best_command(_family))
    register.add_command(_register_command(_family))
