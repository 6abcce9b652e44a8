"""Options shared by several commands."""

from __future__ import annotations

import click

store_option = click.option(
    "--store", type=click.Path(file_okay=False), default=None, envvar="BNET_STORE", show_envvar=True,
    help="Store folder with mlflow.db, optuna.db and artifacts/ [default ./bnet-store].",
)
tracking_uri_option = click.option(
    "--tracking-uri", default=None, envvar=["BNET_TRACKING_URI", "MLFLOW_TRACKING_URI"], show_envvar=True,
    help="MLflow tracking URI (a server or database) [default the store's mlflow.db].",
)
storage_option = click.option(
    "--storage", default=None, envvar="BNET_OPTUNA_STORAGE", show_envvar=True,
    help="Optuna storage URL (SQLAlchemy, e.g. postgresql+psycopg://...) [default the store's optuna.db].",
)


def device_option(default: str = "auto"):
    """Where trials fit; ``default`` is what the command does without it, for ``--help``."""
    return click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default=None,
                        help=f"[default {default}]")


class FamilyCommands(click.Group):
    """A group with one command per model family, made when asked for from the family's
    name (``make_command``): the families are found where they live
    (:func:`bnet.tuning.family.family_names`), not listed here."""

    def __init__(self, *args, make_command, **kwargs):
        super().__init__(*args, **kwargs)
        self.make_command = make_command

    def list_commands(self, ctx: click.Context) -> list[str]:
        from bnet.tuning.family import family_names

        return family_names()

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        from bnet.errors import ConfigError

        if name not in self.list_commands(ctx):
            return None
        try:
            return self.make_command(name)
        except ConfigError:  # an installed family that failed to load (warned about): not listed
            return None


def echo(message: str) -> None:
    """A study's progress line, with any password in a URL (an error's text) shown as ***."""
    from bnet.tracking.secrets import redact

    click.echo(redact(message))


def resolve(store, tracking_uri, storage=None, serving=False):
    from bnet.tracking.store import resolve_store

    return resolve_store(store, tracking_uri, storage, serving)


def runs_link(experiment_id: str, port: int = 5000) -> str:
    """Where the runs table of an experiment is, once ``bnet ui`` serves the store."""
    return f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
