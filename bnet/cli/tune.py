"""``bnet tune``: Optuna studies whose trials are MLflow runs."""

from __future__ import annotations

import click

from bnet.config import PRUNERS, SAMPLERS
from bnet.cli.options import resolve, runs_link, store_option, tracking_uri_option
from bnet.cli.workers import n_workers_option, refuse_sqlite_for_many, run_workers


def study_options(step: str):
    """The options every `bnet tune` command shares: where the study lives, how it samples and
    how much it may spend (in ``step``s: epochs, EM iterations)."""
    return lambda command: _with_study_options(command, step)


def _with_study_options(command, step: str):
    for option in reversed([
        store_option,
        click.option("--storage", default=None,
                     help="Optuna storage URL (SQLAlchemy, e.g. postgresql://...) [default the store's optuna.db]."),
        tracking_uri_option,
        click.option("--sampler", type=click.Choice(SAMPLERS), default=None,
                     help="tpe (Bayesian; conditional and categorical spaces), gp (Gaussian process; small budgets "
                          "of continuous ranges), cmaes (ranges), qmc (Sobol), random or grid [default tpe]."),
        click.option("--pruner", type=click.Choice(PRUNERS), default=None,
                     help="[default auto: hyperband with a --budget-epochs/--budget-iters, else median]"),
        click.option(f"--budget-{step}", "budget_steps", type=int, default=None,
                     help=f"The study's compute: start trials until their {step} add up to this (the last may "
                          f"overshoot by its own), instead of a trial count [default: --n-trials]."),
        click.option("--timeout", type=float, default=None,
                     help="Seconds after which no further trial starts (the running one finishes)."),
        click.option("--warm-start", default=None, metavar="EXPERIMENT[:STUDY]",
                     help="Begin a new study from earlier studies' finished runs of this model class: their best "
                          "configurations first, their results on this same data for the sampler."),
        click.option("--warm-start-any-data", is_flag=True, default=None,
                     help="Warm-start from runs fitted to any data (their configurations only)."),
        click.option("--study", default=None, help="Optuna study name [default the experiment name]."),
        click.option("--seed", type=int, default=None, help="Sampler seed."),
        n_workers_option,
    ]):
        command = option(command)
    return command


@click.group()
def tune():
    """Run (or resume) a hyperparameter study."""


@tune.command("ae")
@click.option("--data", "data_path", type=click.Path(), default=None, help="Session HDF5 file.")
@click.option("--experiment", default=None, help="MLflow experiment (default: the config's).")
@click.option("--n-trials", type=int, default=None,
              help="Finished trials the study should hold; re-running tops it up (resume).")
@click.option("--max-epochs", type=int, default=None, help="max_n_epochs for every trial.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Project YAML (sections data/model/training/compute/tuning).")
@click.option("--data-config", type=click.Path(dir_okay=False), default=None, help="BehaveNet data JSON.")
@click.option("--model-config", type=click.Path(dir_okay=False), default=None, help="BehaveNet model JSON.")
@click.option("--training-config", type=click.Path(dir_okay=False), default=None, help="BehaveNet training JSON.")
@click.option("--compute-config", type=click.Path(dir_okay=False), default=None, help="BehaveNet compute JSON.")
@study_options("epochs")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default=None, help="[default auto]")
def tune_ae(data_path, experiment, n_trials, max_epochs, config_path, data_config, model_config,
            training_config, compute_config, store, storage, tracking_uri, sampler, pruner, budget_steps, timeout,
            warm_start, warm_start_any_data,
            study, seed, n_workers, device):
    """Tune convolutional (or linear) autoencoders on one session."""
    from bnet.config import load_project_config
    from bnet.tuning.ae import tune_ae as run

    _check_counts(n_trials=n_trials, max_epochs=max_epochs, budget_epochs=budget_steps)
    config = load_project_config(config_path, {"data": data_config, "model": model_config,
                                               "training": training_config, "compute": compute_config})
    resolved = resolve(store, tracking_uri, storage)
    if many_workers(n_workers, resolved):
        return
    outcome = run(data=data_path, experiment=experiment, config=config, n_trials=n_trials,
                  budget_steps=budget_steps, timeout=timeout, warm_start=warm_start,
                  warm_start_any_data=warm_start_any_data, max_epochs=max_epochs, sampler=sampler,
                  pruner=pruner, seed=seed, device=device, study=study, store=resolved, echo=click.echo)
    summary(outcome, resolved)


@tune.command("arhmm")
@click.option("--data", "data_path", type=click.Path(), default=None, help="Session HDF5 file.")
@click.option("--ae-experiment", default=None, help="The AE experiment that --ae best searches.")
@click.option("--ae", "ae_ref", default=None, help="AE to segment: best, a run id or models:/NAME@ALIAS [default best].")
@click.option("--labels", is_flag=True, help="Segment the session's labels instead (arhmm-labels; a config's "
              "model_class hmm-labels or arhmm-labels says the same).")
@click.option("--experiment", default=None, help="MLflow experiment (default: the config's).")
@click.option("--n-trials", type=int, default=None,
              help="Finished trials the study should hold; re-running tops it up (resume).")
@click.option("--max-iters", type=int, default=None, help="n_iters (EM iterations) for every trial.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help="Project YAML.")
@click.option("--model-config", type=click.Path(dir_okay=False), default=None, help="BehaveNet arhmm model JSON.")
@click.option("--training-config", type=click.Path(dir_okay=False), default=None, help="BehaveNet arhmm training JSON.")
@study_options("iters")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default=None, help="[default cpu, float64]")
@click.option("--engine", type=click.Choice(["bnet", "ssm"]), default=None,
              help="Fit with bnet's engine or with ssm where it is importable [default bnet].")
def tune_arhmm(data_path, ae_experiment, ae_ref, labels, experiment, n_trials, max_iters, config_path,
               model_config, training_config, store, storage, tracking_uri, sampler, pruner, budget_steps, timeout,
               warm_start, warm_start_any_data,
               study, seed, n_workers, device, engine):
    """Tune ARHMMs over an AE's latents (resolved by an MLflow query) or over labels."""
    from bnet.config import load_project_config
    from bnet.tuning.arhmm import tune_arhmm as run

    _check_counts(n_trials=n_trials, max_iters=max_iters, budget_iters=budget_steps)
    config = load_project_config(config_path, {"model": model_config, "training": training_config})
    config.override(engine=engine)
    resolved = resolve(store, tracking_uri, storage)
    if many_workers(n_workers, resolved):
        return
    outcome = run(data=data_path, experiment=experiment, ae=ae_ref, ae_experiment=ae_experiment, labels=labels,
                  config=config, n_trials=n_trials, budget_steps=budget_steps, timeout=timeout,
                  warm_start=warm_start, warm_start_any_data=warm_start_any_data, max_iters=max_iters,
                  sampler=sampler, pruner=pruner, seed=seed, device=device, study=study, store=resolved,
                  echo=click.echo)
    summary(outcome, resolved)


@tune.command("decoder")
@click.option("--data", "data_path", type=click.Path(), default=None, help="Session HDF5 file (with neural).")
@click.option("--target", type=click.Choice(["ae", "ae-me", "arhmm", "labels"]), required=True,
              help="Behaviour to decode (or, with model_class ae-neural/arhmm-neural, to encode from).")
@click.option("--ae-experiment", default=None, help="The AE experiment that --ae best searches.")
@click.option("--ae", "ae_ref", default=None, help="AE: best, a run id or models:/NAME@ALIAS [default best].")
@click.option("--arhmm-experiment", default=None, help="The ARHMM experiment that --arhmm best searches.")
@click.option("--arhmm", "arhmm_ref", default=None, help="ARHMM: best, a run id or models:/NAME@ALIAS [default best].")
@click.option("--experiment", default=None, help="MLflow experiment (default: the config's).")
@click.option("--n-trials", type=int, default=None, help="Finished trials the study should hold (resume tops up).")
@click.option("--max-epochs", type=int, default=None, help="max_n_epochs for every trial.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help="Project YAML.")
@click.option("--data-config", type=click.Path(dir_okay=False), default=None, help="BehaveNet decoding data JSON.")
@click.option("--model-config", type=click.Path(dir_okay=False), default=None, help="BehaveNet decoding model JSON.")
@click.option("--training-config", type=click.Path(dir_okay=False), default=None, help="BehaveNet training JSON.")
@study_options("epochs")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default=None, help="[default auto]")
def tune_decoder(data_path, target, ae_experiment, ae_ref, arhmm_experiment, arhmm_ref, experiment, n_trials,
                 max_epochs, config_path, data_config, model_config, training_config, store, storage, tracking_uri,
                 sampler, pruner, budget_steps, timeout, warm_start, warm_start_any_data, study, seed, n_workers,
                 device):
    """Tune neural decoders of AE latents, their motion energy, ARHMM states or labels."""
    from bnet.config import load_project_config
    from bnet.tuning.decoder import tune_decoder as run

    _check_counts(n_trials=n_trials, max_epochs=max_epochs, budget_epochs=budget_steps)
    config = load_project_config(config_path, {"data": data_config, "model": model_config,
                                               "training": training_config})
    resolved = resolve(store, tracking_uri, storage)
    if many_workers(n_workers, resolved):
        return
    outcomes = run(data=data_path, target=target, experiment=experiment, ae=ae_ref, ae_experiment=ae_experiment,
                   arhmm=arhmm_ref, arhmm_experiment=arhmm_experiment, config=config, n_trials=n_trials,
                   budget_steps=budget_steps, timeout=timeout, warm_start=warm_start,
                   warm_start_any_data=warm_start_any_data, max_epochs=max_epochs, sampler=sampler, pruner=pruner,
                   seed=seed, device=device, study=study,
                   store=resolved, echo=click.echo)
    for outcome in outcomes:
        summary(outcome, resolved)


def many_workers(n_workers: int, resolved) -> bool:
    """With --n-workers K > 1, run K workers of this very command instead, and say so."""
    if n_workers == 1:
        return False
    refuse_sqlite_for_many(resolved.optuna_storage)
    from bnet.cli.workers import command_line

    run_workers(n_workers, command_line(click.get_current_context()))
    return True


def _check_counts(**counts):
    from bnet.errors import ConfigError

    for name, value in counts.items():
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def summary(outcome, resolved) -> None:
    """The few lines that end a study: counts, failures, the best run, where it all is."""
    click.echo("")
    click.echo(f"study '{outcome.study_name}' in experiment '{outcome.experiment}': "
               f"{outcome.n_complete} complete, {outcome.n_pruned} pruned, {outcome.n_failed} failed")
    for failure in outcome.failures:
        click.echo(f"  failed {failure.splitlines()[0][:200]}")
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
    click.echo(f"runs:   {outcome.tracking_uri} (parent run {outcome.parent_run_id})")
    click.echo(f"study:  {outcome.optuna_storage}")
    if resolved.artifact_root:
        click.echo(f"browse: bnet ui --store {resolved.root}  then  {runs_link(outcome.experiment_id)}")
