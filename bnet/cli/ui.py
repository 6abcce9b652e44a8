"""``bnet ui``: the MLflow UI over the store, on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import click

from bnet.cli.options import resolve, runs_link, store_option, tracking_uri_option


@click.command()
@store_option
@tracking_uri_option
@click.option("--port", default=5000, show_default=True)
def ui(store, tracking_uri, port):
    """Serve the MLflow UI for the store's runs (Ctrl-C or SIGTERM stops it and its workers)."""
    from bnet.tracking.query import experiment_links

    resolved = resolve(store, tracking_uri)
    for name, experiment_id in experiment_links(resolved):
        click.echo(f"  {name}: {runs_link(experiment_id, port)}")
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", resolved.tracking_uri,
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if resolved.artifact_root is not None:
        command += ["--artifacts-destination", str(resolved.artifact_root)]
    click.echo(f"MLflow UI on http://127.0.0.1:{port} over {resolved.tracking_uri}")
    # mlflow server starts uvicorn (and a job runner) as children of its own: in a process
    # group of their own they can all be ended together, whatever signal ends bnet
    server = subprocess.Popen(command, env=env, start_new_session=True)

    def stop(signum=None, frame=None):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        _end_group(server)


def _end_group(server: subprocess.Popen, timeout: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            continue
        try:  # the server may be gone while its workers linger
            os.killpg(server.pid, 0)
        except ProcessLookupError:
            return
