"""``bnet apply``: run tuned models over new recordings (thin over :mod:`bnet.apply`)."""

from __future__ import annotations

import click

from bnet.cli.options import resolve, store_option, tracking_uri_option


@click.group()
def apply():
    """Apply tuned models to sessions they never saw: latents, states, predictions.

    Each session becomes an MLflow run (family apply) in the model's experiment, tagged with
    the model's run and the session's digest; its outputs are the run's exports and, with
    --out, files named after the session."""


def common_options(command):
    for option in reversed((
        click.option("--out", type=click.Path(file_okay=False), default=None,
                     help="Also write each session's outputs here (NAME.latents.hdf5, ...)."),
        click.option("--experiment", default=None, help="Experiment of the apply runs [default the model's]."),
        click.option("--n-workers", default=1, show_default=True, help="Processes sharing the sessions."),
        store_option, tracking_uri_option,
    )):
        command = option(command)
    return command


def _summary(applied) -> None:
    click.echo(f"applied to {len(applied)} session(s); runs: {', '.join(a.run_id for a in applied)}")
    if any(a.files for a in applied):
        click.echo(f"files:  {', '.join(str(f) for a in applied for f in a.files)}")
    click.echo("lineage of any output: bnet lineage FILE (or the run id)")


def session_command(family: str, data_help: str, summary: str) -> click.Command:
    """``bnet apply FAMILY REF --data ...``: one model over new session files."""

    @click.argument("reference", metavar="REF")
    @click.option("--data", "data", multiple=True, required=True, type=click.Path(dir_okay=False), help=data_help)
    @click.option("--model-experiment", default=None, help="The experiment REF=best ranks.")
    @common_options
    def command(reference, data, model_experiment, out, experiment, n_workers, store, tracking_uri):
        from bnet.apply import apply as run

        _summary(run(family, reference, list(data), out, experiment, model_experiment, resolve(store, tracking_uri),
                     n_workers, click.echo))

    command.__doc__ = summary
    return apply.command(family)(command)


session_command("ae", "A new session file (repeatable).",
                "Latents of every trial of new sessions (REF: an AE run id, models:/NAME@ALIAS, or best).")
session_command("decoder", "A new session with neural activity (repeatable).",
                "Predictions from the neural activity of new sessions (REF: a decoder or ensemble run).")


@apply.command()
@click.argument("reference", metavar="REF")
@click.option("--latents", multiple=True, type=click.Path(dir_okay=False),
              help="A latents file (from bnet apply ae, or an AE run's export; repeatable).")
@click.option("--data", "data", multiple=True, type=click.Path(dir_okay=False),
              help="A new session: its frames go through the ARHMM's own AE first (or, for a -labels class, "
                   "its labels are segmented); repeatable.")
@click.option("--model-experiment", default=None, help="The experiment REF=best ranks.")
@common_options
def arhmm(reference, latents, data, model_experiment, out, experiment, n_workers, store, tracking_uri):
    """States (Viterbi and posterior probabilities) of new latents or sessions (REF: an ARHMM run)."""
    from bnet.apply import apply as run, apply_pipeline
    from bnet.apply.sessions import resolve_model
    from bnet.tracking import conventions as tags

    if bool(latents) == bool(data):
        raise click.UsageError("give --latents FILE or --data SESSION (one of them)")
    resolved = resolve(store, tracking_uri)
    if latents:
        return _summary(run("arhmm", reference, list(latents), out, experiment, model_experiment, resolved,
                            n_workers, click.echo))
    model = resolve_model(reference, "arhmm", model_experiment, resolved)
    if not model.tags.get(f"{tags.UPSTREAM_TAG_PREFIX}ae_run_id"):
        return _summary(run("arhmm", reference, list(data), out, experiment, model_experiment, resolved,
                            n_workers, click.echo))
    pairs = apply_pipeline(list(data), reference, None, out, experiment, arhmm_experiment=model_experiment,
                           store=resolved, n_workers=n_workers, echo=click.echo)
    _summary([a for pair in pairs for a in pair])


@apply.command()
@click.option("--ae", "ae_reference", default=None, metavar="REF",
              help="The AE: the ARHMM's own, from its lineage [default]; naming it checks it is.")
@click.option("--arhmm", "arhmm_reference", required=True, metavar="REF", help="The ARHMM.")
@click.option("--data", "data", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="A new video session (repeatable).")
@click.option("--ae-experiment", default=None, help="The experiment --ae best ranks.")
@click.option("--arhmm-experiment", default=None, help="The experiment --arhmm best ranks.")
@common_options
def pipeline(ae_reference, arhmm_reference, data, ae_experiment, arhmm_experiment, out, experiment, n_workers, store,
             tracking_uri):
    """Video session -> latents -> states in one command (two apply runs per session)."""
    from bnet.apply import apply_pipeline

    pairs = apply_pipeline(list(data), arhmm_reference, ae_reference, out, experiment, ae_experiment,
                           arhmm_experiment, resolve(store, tracking_uri), n_workers, click.echo)
    _summary([a for pair in pairs for a in pair])
