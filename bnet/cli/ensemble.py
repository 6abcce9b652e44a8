"""``bnet ensemble`` and ``bnet lineage``."""

from __future__ import annotations

import click

from bnet.cli.options import resolve, store_option, tracking_uri_option


@click.group(invoke_without_command=True)
@click.option("--experiment", default=None, help="Experiment whose finished decoder runs to ensemble.")
@click.option("--study", default=None, help="Only this study's runs.")
@click.option("--max-members", default=5, show_default=True, help="Largest N tried (top-N by the metric).")
@click.option("--metric", default=None, help="Validation metric that ranks runs and picks N [default val_r2, or val_ll for states].")
@click.option("--name", "register_as", default=None, help="Register the ensemble under this model name.")
@click.option("--alias", default="champion", show_default=True)
@store_option
@tracking_uri_option
@click.pass_context
def ensemble(ctx, experiment, study, max_members, metric, register_as, alias, store, tracking_uri):
    """Average the top-N runs of a decoder study, choosing N on validation."""
    if ctx.invoked_subcommand is not None:
        return
    from bnet.ensemble import build_ensemble
    from bnet.errors import ConfigError

    if not experiment:
        raise ConfigError("bnet ensemble needs --experiment NAME (or the subcommand verify RUN_ID)")
    resolved = resolve(store, tracking_uri)
    outcome = build_ensemble(experiment, study, max_members, metric, register_as, alias, resolved, click.echo)
    test = outcome.metric.replace("val", "test", 1)
    click.echo(f"ensemble run {outcome.run_id}: N = {outcome.n_members} (of {len(outcome.curve)} tried)")
    click.echo(f"  {outcome.metric}: ensemble {outcome.val_score:.4f}, best single {outcome.best_single_val:.4f}")
    click.echo(f"  {test}: ensemble {outcome.test_score:.4f}, best single {outcome.best_single_test:.4f}")
    if register_as:
        click.echo(f"registered as models:/{register_as}@{alias}")


@ensemble.command()
@click.argument("run_id")
@click.option("--atol", default=1e-5, show_default=True, help="Largest difference accepted.")
@store_option
@tracking_uri_option
def verify(run_id, atol, store, tracking_uri):
    """Recompute an ensemble's predictions from its members and compare with what was logged."""
    from bnet.ensemble import verify_ensemble

    difference = verify_ensemble(run_id, resolve(store, tracking_uri), atol)
    click.echo(f"ensemble {run_id} verified: recomputed predictions match the logged ones (max |diff| {difference:.2g})")


@click.command()
@click.argument("run_id", metavar="RUN_ID|FILE")
@store_option
@tracking_uri_option
def lineage(run_id, store, tracking_uri):
    """Print the chain of runs (and the data) behind a run, or behind a file a run wrote
    (latents, states, predictions)."""
    from bnet.tracking import conventions as tags
    from bnet.tracking.lineage import lineage as walk

    for step in walk(run_id, resolve(store, tracking_uri)):
        run = step.run
        indent = "  " * step.depth + ("<- " + step.via + ": " if step.via else "")
        scores = ", ".join(f"{k} {v:.4g}" for k, v in run.metrics.items()
                           if k in ("best_val_loss", "val_ll_per_step", "val_r2", "val_ll", "val_accuracy"))
        click.echo(f"{indent}{run.family} run {run.run_id} ({run.tags.get(tags.TAG_MODEL_CLASS, run.family)}, "
                   f"study {run.tags.get(tags.TAG_STUDY, '-')}) {scores}")
        reads_data = run.family == "apply" or not any(k.startswith(tags.UPSTREAM_TAG_PREFIX) for k in run.tags)
        if reads_data and step.via != "member":
            click.echo(f"{'  ' * (step.depth + 1)}<- data: {run.tags.get(tags.TAG_DATA_PATH)} "
                       f"[{run.tags.get(tags.TAG_DATASET)}, hash {run.tags.get(tags.TAG_DATA_HASH)}]")
