"""``bnet ui``: the MLflow UI over the store, on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys

import click

from bnet.cli.options import resolve, store_option, tracking_uri_option


@click.command()
@store_option
@tracking_uri_option
@click.option("--port", default=5000, show_default=True)
def ui(store, tracking_uri, port):
    """Serve the MLflow UI for the store's runs (Ctrl-C stops it)."""
    from bnet.tracking.store import connect

    resolved = resolve(store, tracking_uri)
    client = connect(resolved)
    for experiment in client.search_experiments():
        click.echo(f"  {experiment.name}: http://127.0.0.1:{port}/#/experiments/"
                   f"{experiment.experiment_id}/runs?workflowType=machine_learning")
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", resolved.tracking_uri,
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if resolved.artifact_root is not None:
        command += ["--artifacts-destination", str(resolved.artifact_root)]
    click.echo(f"MLflow UI on http://127.0.0.1:{port} over {resolved.tracking_uri}")
    try:
        subprocess.run(command, env=env, check=False)
    except KeyboardInterrupt:
        pass
