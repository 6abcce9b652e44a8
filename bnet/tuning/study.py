"""Optuna studies whose trials are MLflow runs.

One parent MLflow run per study, one child run per trial (``mlflow.parentRunId``), the
Optuna trial carrying its run id (user attribute ``mlflow_run_id``) and the run carrying the
trial number and study (tags). ``n_trials`` is the number of finished trials the study should
hold: re-running the same command tops it up, so a killed study resumes without losing
finished trials, and several workers pointed at one storage share the count.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import optuna

from bnet.config import Dimension, TuningConfig
from bnet.errors import BnetError, ConfigError
from bnet.tracking import conventions as tags
from bnet.tracking.runs import RunLogger, create_run
from bnet.tracking.store import Store, connect, ensure_experiment, refresh_statistics, retry_schema_race
from bnet.tuning import space

MLFLOW_RUN_ATTR = "mlflow_run_id"
PARENT_RUN_ATTR = "mlflow_parent_run_id"
FINISHED_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

Echo = Callable[[str], None]


@dataclass
class StudySpec:
    """Everything a study needs besides the per-trial fitting function.

    Attributes:
        experiment: MLflow experiment name.
        family: model family of the trials (``ae``, ...), tagged on every run.
        tuning: sampler, pruner, metric, trial count.
        fixed: hyperparameters that are the same in every trial.
        dimensions: hyperparameters the sampler chooses.
        store: where runs and the study live.
        run_tags: tags every run of the study carries (dataset, data hash, ...).
        objective_key: the per-epoch metric reported to the pruner.
    """

    experiment: str
    family: str
    tuning: TuningConfig
    fixed: dict[str, Any]
    dimensions: dict[str, Dimension]
    store: Store
    run_tags: dict[str, str] = field(default_factory=dict)
    objective_key: str = "val_loss"

    @property
    def study_name(self) -> str:
        return self.tuning.study or self.experiment


@dataclass
class TrialContext:
    """What a fitting function gets for one trial."""

    number: int
    hparams: dict[str, Any]
    run: RunLogger
    on_epoch_end: Callable[[int, dict[str, float]], None]
    echo: Echo


@dataclass
class StudyOutcome:
    study_name: str
    experiment: str
    experiment_id: str
    parent_run_id: str
    n_complete: int
    n_pruned: int
    n_failed: int
    best_trial: int | None
    best_value: float | None
    best_run_id: str | None
    tracking_uri: str
    optuna_storage: str
    ran_now: int
    metric: str


FitTrial = Callable[[TrialContext], dict[str, float]]


def make_sampler(tuning: TuningConfig, dimensions: dict[str, Dimension]):
    if tuning.sampler == "grid":
        return optuna.samplers.GridSampler(space.grid(dimensions), seed=tuning.seed)
    if tuning.sampler == "random":
        return optuna.samplers.RandomSampler(seed=tuning.seed)
    return optuna.samplers.TPESampler(seed=tuning.seed, multivariate=True, group=True,
                                      n_startup_trials=min(10, max(2, tuning.n_trials // 3)))


def make_pruner(tuning: TuningConfig):
    if tuning.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)
    if tuning.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def open_study(spec: StudySpec) -> optuna.Study:
    """Create or load the Optuna study (same name in the same storage = the same study)."""
    # heartbeats (to fail trials of killed workers) and grouped TPE are marked experimental
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = retry_schema_race(lambda: optuna.storages.RDBStorage(
        spec.store.optuna_storage,
        heartbeat_interval=60,
        grace_period=180,
        engine_kwargs={"connect_args": {"timeout": 60}} if spec.store.optuna_storage.startswith("sqlite") else {},
    ))
    study = optuna.create_study(
        study_name=spec.study_name, storage=storage, load_if_exists=True,
        direction=spec.tuning.direction, sampler=make_sampler(spec.tuning, spec.dimensions),
        pruner=make_pruner(spec.tuning),
    )
    wanted = optuna.study.StudyDirection.MINIMIZE if spec.tuning.direction == "minimize" else optuna.study.StudyDirection.MAXIMIZE
    if study.direction != wanted:
        raise ConfigError(
            f"study '{spec.study_name}' exists with direction {study.direction.name.lower()}, "
            f"not {spec.tuning.direction}; use another --study name"
        )
    return study


def _parent_run(client, experiment_id: str, study: optuna.Study, spec: StudySpec) -> RunLogger:
    parent_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if parent_id:
        client.update_run(parent_id, status="RUNNING")
        return RunLogger(client, parent_id)
    run = create_run(
        client, experiment_id, run_name=f"study {spec.study_name}",
        run_tags={tags.TAG_ROLE: tags.ROLE_STUDY, tags.TAG_STUDY: spec.study_name,
                  tags.TAG_FAMILY: spec.family, **spec.run_tags},
    )
    run.log_params({**spec.fixed, **{f"search.{k}": _describe(v) for k, v in spec.dimensions.items()},
                    "tuning.sampler": spec.tuning.sampler, "tuning.pruner": spec.tuning.pruner,
                    "tuning.metric": spec.tuning.metric, "tuning.direction": spec.tuning.direction})
    study.set_user_attr(PARENT_RUN_ATTR, run.run_id)
    return run


def _describe(dim: Dimension) -> str:
    return str(getattr(dim, "choices", None) or f"[{dim.low}, {dim.high}]{' log' if dim.log else ''}")


def _close_orphaned_runs(client, study: optuna.Study) -> None:
    """Runs whose trial failed while its process was gone (killed workers) end as FAILED."""
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
        run_id = trial.user_attrs.get(MLFLOW_RUN_ATTR)
        if run_id and client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, tags.TAG_TRIAL_STATE, "FAIL")
            client.set_terminated(run_id, status="FAILED")


def _count(study: optuna.Study) -> dict[str, int]:
    counts = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0, "RUNNING": 0}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def run_study(spec: StudySpec, fit_trial: FitTrial, echo: Echo = print) -> StudyOutcome:
    """Run (or resume) a study until it holds ``spec.tuning.n_trials`` finished trials."""
    spec.tuning.validate()
    if not spec.dimensions and spec.tuning.n_trials > 1:
        echo("note: the config searches nothing (no lists or ranges): every trial repeats the same "
             "hyperparameters; pass --config with a search space")
    if spec.tuning.sampler == "grid" and space.grid_size(spec.dimensions) < spec.tuning.n_trials:
        echo(f"note: the grid has {space.grid_size(spec.dimensions)} points; the study stops there")
    client = connect(spec.store)
    experiment_id = ensure_experiment(client, spec.store, spec.experiment)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(spec)
    _close_orphaned_runs(client, study)
    parent = _parent_run(client, experiment_id, study, spec)

    counts = _count(study)
    done = counts["COMPLETE"] + counts["PRUNED"]
    to_run = max(spec.tuning.n_trials - done, 0)
    if spec.tuning.sampler == "grid":
        to_run = min(to_run, max(space.grid_size(spec.dimensions) - done, 0))
    if done:
        echo(f"study '{spec.study_name}' resumes with {done} finished trials; {to_run} to go")
    else:
        echo(f"study '{spec.study_name}': {to_run} trials, sampler {spec.tuning.sampler}, "
             f"pruner {spec.tuning.pruner}, objective {spec.tuning.direction} {spec.tuning.metric}")

    def objective(trial: optuna.Trial) -> float:
        chosen = space.suggest(trial, spec.dimensions)
        hparams = {**spec.fixed, **chosen}
        run = create_run(
            client, experiment_id, run_name=f"{spec.study_name}-trial-{trial.number:03d}",
            run_tags={tags.TAG_ROLE: tags.ROLE_TRIAL, tags.TAG_FAMILY: spec.family,
                      tags.TAG_STUDY: spec.study_name, tags.TAG_TRIAL: trial.number,
                      **spec.run_tags},
            parent_run_id=parent.run_id,
        )
        trial.set_user_attr(MLFLOW_RUN_ATTR, run.run_id)
        run.log_params(hparams)
        described = ", ".join(f"{k}={_short(v)}" for k, v in chosen.items())
        echo(f"trial {trial.number} (run {run.run_id[:8]}) {described}")
        started = time.perf_counter()

        def on_epoch_end(step: int, metrics: dict[str, float]) -> None:
            run.log_metrics(metrics, step=step)
            value = metrics.get(spec.objective_key)
            if value is not None and math.isfinite(value):
                trial.report(value, step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at step {step}")

        context = TrialContext(trial.number, hparams, run, on_epoch_end, echo)
        try:
            metrics = fit_trial(context)
        except optuna.TrialPruned:
            run.set_tags({tags.TAG_TRIAL_STATE: "PRUNED"})
            run.terminate("KILLED")
            echo(f"trial {trial.number} pruned after {time.perf_counter() - started:.0f} s")
            raise
        except BaseException as err:
            run.set_tags({tags.TAG_TRIAL_STATE: "FAIL", "bnet.error": f"{type(err).__name__}: {err}"[:5000]})
            run.terminate("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise
        run.log_metrics(metrics)
        run.set_tags({tags.TAG_TRIAL_STATE: "COMPLETE"})
        run.terminate("FINISHED")
        value = metrics[spec.tuning.metric]
        echo(f"trial {trial.number} done in {time.perf_counter() - started:.0f} s: "
             f"{spec.tuning.metric} {value:.6g}")
        return value

    interrupted = None
    try:
        if to_run:
            study.optimize(
                objective, n_trials=to_run, catch=(),
                callbacks=[optuna.study.MaxTrialsCallback(spec.tuning.n_trials, states=FINISHED_STATES)],
            )
    except KeyboardInterrupt as err:
        interrupted = err
    except BnetError:
        parent.terminate("FAILED")
        raise
    finally:
        counts = _count(study)

    best_trial = best_value = best_run = None
    if counts["COMPLETE"]:
        best = study.best_trial
        best_trial, best_value = best.number, best.value
        best_run = best.user_attrs.get(MLFLOW_RUN_ATTR)
        parent.log_metrics({spec.tuning.metric: best_value, "n_complete": counts["COMPLETE"],
                            "n_pruned": counts["PRUNED"], "n_failed": counts["FAIL"]})
        parent.set_tags({"bnet.best_trial": best_trial, "bnet.best_run_id": best_run})
    parent.terminate("KILLED" if interrupted else "FINISHED")
    refresh_statistics(spec.store)
    if interrupted:
        raise interrupted
    return StudyOutcome(
        study_name=spec.study_name, experiment=spec.experiment, experiment_id=experiment_id,
        parent_run_id=parent.run_id, n_complete=counts["COMPLETE"], n_pruned=counts["PRUNED"],
        n_failed=counts["FAIL"], best_trial=best_trial, best_value=best_value,
        best_run_id=best_run, tracking_uri=spec.store.tracking_uri,
        optuna_storage=spec.store.optuna_storage, ran_now=to_run, metric=spec.tuning.metric,
    )


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
