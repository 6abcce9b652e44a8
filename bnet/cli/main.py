"""The ``bnet`` command: thin Click commands over the Python API.

Heavy imports (torch, mlflow, optuna) happen inside commands so ``bnet --help`` is quick.
Errors of the data, the config or the run (:class:`bnet.errors.BnetError`) print one line and
exit 1; usage errors (an unknown option, a bad option value) exit 2, as Click's own.
"""

from __future__ import annotations

import sys

import click

from bnet.cli.apply import apply
from bnet.cli.best import best, register
from bnet.cli.data import data
from bnet.cli.ensemble import ensemble, lineage
from bnet.cli.plot import plot
from bnet.cli.report import dashboard, report
from bnet.cli.server import postgres, server, ui
from bnet.cli.tune import tune
from bnet.cli.workers import slurm, worker


class BnetGroup(click.Group):
    def invoke(self, ctx):
        from bnet.errors import BnetError
        from bnet.tracking.secrets import redact

        try:
            return super().invoke(ctx)
        except BnetError as err:
            click.secho(f"error: {redact(str(err))}", fg="red", err=True)
            sys.exit(1)
        except Exception as err:
            refusal = server_refusal(err)
            if refusal is None:
                raise
            click.secho(f"error: {refusal}", fg="red", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.secho("interrupted: finished trials are kept; re-run the same command to resume",
                        fg="yellow", err=True)
            sys.exit(130)


def server_refusal(err: Exception) -> str | None:
    """What to do when a tracking server refused a request for want of credentials (401) or
    permission (403); None for any other error."""
    from bnet.tracking.secrets import redact

    text = str(err)
    if type(err).__name__ not in ("MlflowException", "RestException") or not any(
            sign in text for sign in ("error code 401", "error code 403", "UNAUTHENTICATED", "PERMISSION_DENIED")):
        return None
    if "error code 401" in text or "UNAUTHENTICATED" in text:
        return ("the tracking server asks for a user and password: set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials) to a user of that server")
    return (f"the tracking server refused: this user has no permission for that "
            f"({redact(text.splitlines()[0])[:200]}); "
            f"ask its admin for one (README, Security)")


@click.group(cls=BnetGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bnet")
def cli():
    """bnet: BehaveNet studies tracked in MLflow and tuned by Optuna."""


for command in (data, tune, worker, slurm, best, register, apply, ensemble, lineage, plot, report, ui, dashboard, server,
                postgres):
    cli.add_command(command)


def main():
    cli(prog_name="bnet")
