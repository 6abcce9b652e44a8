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

        try:
            return super().invoke(ctx)
        except BnetError as err:
            click.secho(f"error: {err}", fg="red", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.secho("interrupted: finished trials are kept; re-run the same command to resume",
                        fg="yellow", err=True)
            sys.exit(130)


@click.group(cls=BnetGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bnet")
def cli():
    """bnet: BehaveNet studies tracked in MLflow and tuned by Optuna."""


for command in (data, tune, worker, slurm, best, register, apply, ensemble, lineage, plot, report, ui, dashboard, server,
                postgres):
    cli.add_command(command)


def main():
    cli(prog_name="bnet")
