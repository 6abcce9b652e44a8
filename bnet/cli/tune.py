"""``bnet tune <family>``: Optuna studies whose trials are MLflow runs.

One command per registered family, made from its declaration (:class:`bnet.tuning.family.Family`):
the options every study takes, the upstream runs it reads (``--ae REF``), the family's own
options, its BehaveNet JSON sections and how it names a trial's steps (``--max-epochs``).
"""

from __future__ import annotations

import click

from bnet.cli.options import (
    FamilyCommands, device_option, echo, resolve, runs_link, storage_option, store_option, tracking_uri_option,
)
from bnet.cli.workers import n_workers_option, refuse_sqlite_for_many, run_workers
from bnet.config import SCHEDULERS
from bnet.tuning.samplers import AUTO_PRUNER, PRUNERS, SAMPLERS, described


def study_options(step: str):
    """The options every `bnet tune` command shares: where the study lives, how it samples and
    how much it may spend (in ``step``s: epochs, EM iterations)."""
    return lambda command: _with_options(command, [
        store_option,
        storage_option,
        tracking_uri_option,
        click.option("--sampler", type=click.Choice(list(SAMPLERS)), default=None,
                     help=f"{described(SAMPLERS)} [default tpe]."),
        click.option("--pruner", type=click.Choice([AUTO_PRUNER, *PRUNERS]), default=None,
                     help=f"{described(PRUNERS)} [default {AUTO_PRUNER}: hyperband with a --budget-{step}, "
                          f"else median]."),
        click.option(f"--budget-{step}", "budget_steps", type=click.IntRange(min=1), default=None,
                     help=f"The study's compute: start trials until their {step} add up to this (the last may "
                          f"overshoot by its own), instead of a trial count [default: --n-trials]."),
        click.option("--timeout", type=float, default=None,
                     help="Seconds after which no further trial starts (the running one finishes)."),
        click.option("--warm-start", default=None, metavar="EXPERIMENT[:STUDY]",
                     help="Begin a new study from earlier studies' finished runs of this model class: their best "
                          "configurations first, their results on this same data for the sampler."),
        click.option("--warm-start-any-data", is_flag=True, default=None,
                     help="Warm-start from runs fitted to any data (their configurations only)."),
        click.option("--system-metrics", is_flag=True, default=None,
                     help="Log each trial's CPU, memory, disk, network and GPU use (MLflow's system metrics)."),
        click.option("--study", default=None, help="Optuna study name [default the experiment name]."),
        click.option("--seed", type=int, default=None, help="Sampler seed."),
        click.option("--scheduler", type=click.Choice(list(SCHEDULERS)), default=None,
                     help="optuna: trials one after another, sampled and pruned [default]; pbt: population-based "
                          "training of members at once (Ray Tune; families trained by epochs)."),
        click.option("--population", type=click.IntRange(min=2), default=None,
                     help="Members of a --scheduler pbt population [default 4]."),
        click.option("--perturbation-interval", type=click.IntRange(min=1), default=None,
                     help=f"{step.capitalize()} between a pbt population's exploit-and-explore steps [default 4]."),
        n_workers_option,
    ])


def _with_options(command, options):
    for option in reversed(options):
        command = option(command)
    return command


def tune_command(name: str) -> click.Command:
    """``bnet tune NAME``, from the family's declaration."""
    from bnet.tuning.family import get_family

    family = get_family(name)

    def run(data_path, experiment, n_trials, max_steps, config_path, store, storage, tracking_uri, device, n_workers,
            **options):
        from bnet.config import load_project_config
        from bnet.tuning.tune import tune

        sections = {section: options.pop(f"{section}_config") for section in family.behavenet_configs}
        config = load_project_config(config_path, sections)
        resolved = resolve(store, tracking_uri, storage)
        if many_workers(n_workers, resolved):
            return
        for outcome in tune(family.name, data_path, experiment, config, n_trials=n_trials, max_steps=max_steps,
                            device=device, store=resolved, echo=echo, **options):
            summary(outcome, resolved)

    upstream = [option for other in family.upstream for flag in (other.replace("_", "-"),) for option in (
        click.option(f"--{flag}-experiment", f"{other}_experiment", default=None,
                     help=f"The {flag} experiment that --{flag} best searches."),
        click.option(f"--{flag}", other, default=None,
                     help=f"The {flag} run to read: best, a run id or models:/NAME@ALIAS [default best]."))]
    own = [click.option(f"--{option.name.replace('_', '-')}", option.name, is_flag=option.flag,
                        default=None, required=option.required, help=option.help,
                        type=click.Choice(option.choices) if option.choices else None)
           for option in family.options]
    sections = [click.option(f"--{section}-config", type=click.Path(dir_okay=False), default=None,
                             help=f"BehaveNet {section} JSON.") for section in family.behavenet_configs]
    return click.command(name, help=family.summary or f"Tune {name} models.")(_with_options(run, [
        click.option("--data", "data_path", type=click.Path(), default=None, help="Session HDF5 file."),
        *upstream,
        *own,
        click.option("--experiment", default=None, help="MLflow experiment (default: the config's)."),
        click.option("--n-trials", type=click.IntRange(min=1), default=None,
                     help="Finished trials the study should hold; re-running tops it up (resume)."),
        click.option(f"--max-{family.budget_flag}", "max_steps", type=click.IntRange(min=1), default=None,
                     help=f"{family.budget_key} ({family.step_name}s) for every trial."),
        click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                     help="Project YAML (sections data/model/training/compute/tuning)."),
        *sections,
        study_options(family.budget_flag),
        device_option(family.default_device),
    ]))


@click.group(cls=FamilyCommands, make_command=tune_command)
def tune():
    """Run (or resume) a hyperparameter study."""


def many_workers(n_workers: int, resolved) -> bool:
    """With --n-workers K > 1, run K workers of this very command instead, and say so."""
    if n_workers == 1:
        return False
    if click.get_current_context().params.get("scheduler") == "pbt":
        from bnet.errors import ConfigError

        raise ConfigError("--scheduler pbt trains its members at once on this machine; --n-workers is for Optuna "
                          "studies (drop one of them)")
    refuse_sqlite_for_many(resolved.optuna_storage)
    from bnet.cli.workers import command_line

    run_workers(n_workers, command_line(click.get_current_context()))
    return True


def summary(outcome, resolved) -> None:
    """The few lines that end a study: counts, failures, the best run, where it all is (any
    password in a URL shown as ***)."""
    from bnet.tracking.secrets import redact

    click.echo("")
    click.echo(f"study '{outcome.study_name}' in experiment '{outcome.experiment}': "
               f"{outcome.n_complete} complete, {outcome.n_pruned} pruned, {outcome.n_failed} failed")
    for failure in outcome.failures:
        click.echo(f"  failed {redact(failure.splitlines()[0])[:200]}")
    if outcome.best_run_id:
        if outcome.pareto:
            click.echo(f"Pareto front ({len(outcome.pareto)} trials):")
            for point in outcome.pareto:
                values = "  ".join(f"{k} {v:.6g}" for k, v in point.values.items())
                click.echo(f"  trial {point.trial}, run {point.run_id}: {values}")
        else:
            click.echo(f"best: trial {outcome.best_trial}, run {outcome.best_run_id}, "
                       f"{outcome.metric} {outcome.best_value:.6g} ({outcome.direction})")
        if outcome.trivial is not None:
            click.echo(outcome.trivial.sentence("the best model"))
    click.echo(f"spent:  {outcome.spent()}")
    click.echo(f"runs:   {redact(outcome.tracking_uri)} (parent run {outcome.parent_run_id})")
    click.echo(f"study:  {redact(outcome.optuna_storage)}")
    if resolved.artifact_root:
        click.echo(f"browse: bnet ui --store {resolved.root}  then  {runs_link(outcome.experiment_id)}")
