"""``bnet report`` and ``bnet dashboard``: a study at a glance, on a page or live."""

from __future__ import annotations

import click

from bnet.cli.options import resolve, storage_option, store_option, tracking_uri_option

@click.command()
@click.argument("study")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="report.html (the whole page) or .png (the summary figure) [default report-STUDY.html].")
@click.option("--no-log", is_flag=True, help="Do not log it on the study's parent run.")
@store_option
@tracking_uri_option
@storage_option
def report(study, out, no_log, store, tracking_uri, storage):
    """Write one page about a study: the summary, Optuna's optimisation history, parameter
    importances and parallel coordinates, the best trials, and the best run's figures."""
    from bnet.plotting.report import write_report

    written = write_report(study, resolve(store, tracking_uri, storage), out, log=not no_log)
    click.echo(f"wrote {written.path}: {written.n_figures} figures"
               + ("" if no_log else f", logged as report/{written.path.name} of parent run {written.parent_run_id}"))
    for note in written.notes:
        click.echo(f"  note: {note}")
    if written.trivial is not None:
        click.echo(written.trivial.sentence("the best model"))


@click.command()
@store_option
@storage_option
@click.option("--port", default=8080, show_default=True)
def dashboard(store, storage, port):
    """Serve optuna-dashboard on 127.0.0.1 over the store's Optuna storage (Ctrl-C stops it)."""
    from optuna_dashboard import run_server

    from bnet.tracking.secrets import redact

    resolved = resolve(store, None, storage)
    click.echo(f"optuna-dashboard on http://127.0.0.1:{port} over {redact(resolved.optuna_storage)}")
    run_server(resolved.optuna_storage, host="127.0.0.1", port=port)
