"""The study engine: Optuna studies whose trials are MLflow runs, for every family.

One parent MLflow run per study, one child run per trial (``mlflow.parentRunId``), the
Optuna trial carrying its run id (user attribute ``mlflow_run_id``) and the run carrying the
trial number, study and objective (tags). ``n_trials`` is the number of finished trials the
study should hold: re-running the same command tops it up, so a killed study resumes
without losing finished trials, and several workers pointed at one storage share the count.

What the engine guarantees, whatever the family:

* the pruner sees the family's per-step objective, on the study's scale and direction;
* a trial that raises (a diverging loss, a NaN metric, CUDA out of memory) fails alone:
  its run ends FAILED with the reason, the study goes on, the summary counts it;
* trials of dead workers fail when the study opens, and their runs end KILLED; SIGTERM
  stops the running trial cleanly at its next step, like Ctrl-C;
* a study resumes only over the same data, upstream runs and fixed hyperparameters;
* a configuration already finished on the same data is not fitted again.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
import traceback
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from bnet.config import TuningConfig
from bnet.data.session import Session
from bnet.data.sessions import SessionGroup, members
from bnet.errors import BnetError, ConfigError
from bnet.progress import Echo, Progress, say
from bnet.tracking import conventions as tags
from bnet.tracking.runs import RunLogger, is_transient, retry_transient
from bnet.tracking.store import Store, refresh_statistics, retry_schema_race, schema_lock
from bnet.tracking.tracker import Tracker
from bnet.training.loop import TrainingState
from bnet.tuning.family import Family, Objective, PreparedStudy, TrialFitter, TrialResult
from bnet.tuning.identity import FitIdentity, differences, fingerprint
from bnet.tuning.recovery import (
    GRACE_SECONDS, HEARTBEAT_SECONDS, MLFLOW_RUN_ATTR, RETRY_OF_RUN_ATTR, WORKER_ATTR, close_orphaned_runs,
    dead_trial_handler,
    parent_run_id, queue_retry, recover_dead_trials, storage_id, this_worker,
)
from bnet.tuning.samplers import make_pruner, make_sampler
from bnet.tuning.space import SearchSpace
from bnet.tuning.trivial import TrivialComparison
from bnet.tuning.warm_start import gather, own_trials

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
FINGERPRINT_ATTR = "bnet_fingerprint"
RECIPE_ATTR = "bnet_recipe"  # what `bnet worker --study` needs to join from another machine
DUPLICATE_ATTR = "bnet_same_config_as_run"
MAX_CONSECUTIVE_FAILURES = 3
SURPLUS_ATTR = "bnet_surplus"
STEPS_ATTR = "bnet_steps"  # steps (epochs, EM iterations) a trial trained: what it cost
POLL_SECONDS = 5.0


class StudyInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: the running trial stopped between steps; finished trials are kept."""


class SurplusTrial(Exception):
    """A trial started by two workers' race for the last needed one: failed unfitted."""


class TrialsKeepFailing(BnetError):
    """Several trials in a row failed: the cause is not one trial's hyperparameters."""


@dataclass
class StudySpec:
    """One study to run: the family's prepared trials, the space, the budget, the store."""

    experiment: str
    family: Family
    prepared: PreparedStudy
    tuning: TuningConfig
    space: SearchSpace
    fixed: dict[str, Any]
    store: Store
    recipe: dict[str, Any] = field(default_factory=dict)

    @property
    def study_name(self) -> str:
        return "-".join(filter(None, [self.tuning.study or self.experiment, self.prepared.study_suffix]))

    @property
    def objective(self) -> Objective:
        return self.prepared.objective

    @property
    def session(self) -> Session | SessionGroup:
        return self.prepared.session

    @property
    def run_tags(self) -> dict[str, str]:
        session = self.session
        return {tags.TAG_FAMILY: self.family.name, tags.TAG_STUDY: self.study_name,
                tags.TAG_DATASET: session.dataset_id, tags.TAG_DATA_HASH: session.data_hash,
                tags.TAG_DATA_PATH: str(session.path), tags.TAG_OBJECTIVE: self.objective.metric,
                tags.TAG_DIRECTION: self.objective.direction,
                **({tags.TAG_OBJECTIVES: self.objective.describe()} if self.objective.is_multi else {}),
                **self.prepared.run_tags}

    def log_dataset(self, run) -> None:
        """The session files a run fits, as its MLflow dataset inputs (the UI's Dataset column)."""
        for member in members(self.session):
            run.log_dataset(member.path, member.dataset_id, member.data_hash)

    def fingerprint(self) -> dict[str, Any]:
        """What must not change when the study resumes."""
        return fingerprint(self.family, self.prepared, self.objective.metrics, self.fixed, self.space)


@dataclass
class TrialContext:
    """What a family's ``fit`` gets for one trial (or for one stage of a pipeline trial)."""

    number: int
    hparams: dict[str, Any]
    run: RunLogger
    echo: Echo
    _report: Callable[["TrialContext", int, dict[str, float], int, int | None, Callable | None], None] = field(
        repr=False)
    _stages: "StageRuns | None" = field(default=None, repr=False)
    stage: str = ""
    """The stage this context fits (``ae``, ``arhmm``...); "" for a whole trial."""
    prunes: bool = True
    """Whether this context's steps reach the pruner (a pipeline's stages log series of
    their own families' names, which are no objective of the pipeline's study)."""
    step_name: str = ""
    """What one of this context's steps is, in progress lines ("": the family's)."""
    spends_budget: bool = True
    """Whether this context's steps count in the study's budget (``budget_steps``, in the
    family's steps: a pipeline's AE epochs, not its downstream stages' steps)."""
    resume: TrainingState | None = None
    """A gradient-trained fit's state to go on from (a population-based member's checkpoint)."""

    def report(self, step: int, metrics: dict[str, float], total: int, shown: int | None = None,
               state: Callable[[], TrainingState] | None = None) -> None:
        """Log one step's metrics on this context's run (MLflow step ``step``), show progress
        (``shown`` of ``total``), hand the objective's step metric to the pruner; raises
        ``optuna.TrialPruned`` or :class:`StudyInterrupted` to stop the fit. ``state`` takes
        the fit's state after this step, where a scheduler keeps checkpoints of it."""
        self._report(self, step, metrics, total, shown, state)

    def fit_stage(self, stage: str, family: str, objective: Objective, fitter: TrialFitter, hparams: dict[str, Any],
                  run_tags: dict[str, str], step_name: str, spends_budget: bool = False) -> tuple[TrialResult, str]:
        """Fit one stage of a pipeline trial with a family's own fitter, as an MLflow run
        nested under the trial's run (role ``stage``; the family's tags and its studies'
        ``objective``, so the run ranks and registers like that family's trials; the given
        lineage tags): params, per-step metrics, final metrics, checkpoint and the family's
        figures. Returns the result and the run id; the run ends FINISHED, or KILLED/FAILED
        with the reason when the stage stops the trial."""
        if self._stages is None:
            raise RuntimeError("stages are fitted within a study's trial")
        params, model_tags = fitter.resolve(hparams)
        run = self._stages.create(self, stage, {tags.TAG_FAMILY: family, tags.TAG_OBJECTIVE: objective.metric,
                                                tags.TAG_DIRECTION: objective.direction, **model_tags, **run_tags})
        context = replace(self, hparams=hparams, run=run, stage=stage, prunes=False, step_name=step_name,
                          spends_budget=spends_budget)
        with self._stages.closing(run):
            self._stages.spec.log_dataset(run)
            run.log_params(params)
            result = fitter.fit(context)
            run.log_metrics(result.metrics)
            run.log_checkpoint(result.model, {**self._stages.checkpoint_metadata, **run_tags,
                                              **result.checkpoint_metadata})
        return result, run.run_id


class StageRuns:
    """Creates and closes the runs of a pipeline trial's stages (:meth:`TrialContext.fit_stage`)."""

    def __init__(self, spec: "StudySpec", tracker: Tracker, experiment_id: str):
        self.spec, self.tracker, self.experiment_id = spec, tracker, experiment_id
        self.checkpoint_metadata = {"dataset": spec.session.dataset_id, "data_hash": spec.session.data_hash}

    def create(self, trial: TrialContext, stage: str, run_tags: dict[str, str]) -> RunLogger:
        """The stage's run: the study's session tags, the trial's number, and ``run_tags``."""
        session_tags = {k: v for k, v in self.spec.run_tags.items() if k != tags.TAG_OBJECTIVES}
        run = self.tracker.create_run(
            self.experiment_id, run_name=f"{self.spec.study_name}-trial-{trial.number:03d}-{stage}",
            run_tags={**session_tags, tags.TAG_ROLE: tags.ROLE_STAGE, tags.TAG_STAGE: stage,
                      tags.TAG_TRIAL: trial.number, tags.TAG_PIPELINE_RUN: trial.run.run_id, **run_tags},
            parent_run_id=trial.run.run_id)
        return run

    @contextmanager
    def closing(self, run: RunLogger):
        try:
            yield
        except optuna.TrialPruned as pruned:
            self.tracker.close(run.run_id, "KILLED", "PRUNED", str(pruned))
            raise
        except KeyboardInterrupt as stop:
            self.tracker.close(run.run_id, "KILLED", "FAIL", f"interrupted ({stop or 'Ctrl-C'})")
            raise
        except Exception as err:
            run.log_text("".join(traceback.format_exception(err)), "error.txt")
            self.tracker.close(run.run_id, "FAILED", "FAIL", f"{type(err).__name__}: {err}")
            raise
        self.tracker.close(run.run_id, "FINISHED", "COMPLETE")


@dataclass
class ParetoPoint:
    """A trial on a multi-objective study's Pareto front."""

    trial: int
    run_id: str
    values: dict[str, float]


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
    direction: str = "minimize"
    failures: list[str] = field(default_factory=list)
    pareto: list[ParetoPoint] = field(default_factory=list)
    trivial: TrivialComparison | None = None
    """How the best run compares with the family's trivial answer (None: no such metrics)."""
    steps_spent: int = 0
    """Steps trained by all the study's trials (``step_name``s: epochs, EM iterations)."""
    step_name: str = "step"
    budget_steps: int | None = None

    def spent(self) -> str:
        """What the study spent, in words (and of which budget)."""
        budget = f" of a budget of {self.budget_steps:,}" if self.budget_steps else ""
        return f"{self.steps_spent:,} {self.step_name}s trained{budget}"


def _budget(spec: StudySpec) -> int | None:
    value = spec.fixed.get(spec.family.budget_key)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _storage(spec: StudySpec, tracker: Tracker, echo: Echo):
    url = spec.store.optuna_storage
    with schema_lock(spec.store, url):
        return retry_schema_race(lambda: _HeartbeatStorage(
            url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
            heartbeat_stale_trial_callback=dead_trial_handler(tracker, echo),
            # a database server's pooled connections die with a restart: test each before use
            engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True},
        ))


def open_study(spec: StudySpec, storage, echo: Echo = say) -> optuna.Study:
    """Create or load the Optuna study; refuse one that optimises something else or was
    started on other data, other upstream runs or other fixed hyperparameters. A new study
    queues the config's points first, then a warm start's (:mod:`bnet.tuning.warm_start`)."""
    warm = None
    if spec.tuning.warm_start and not _exists(spec.study_name, storage):
        warm = gather(spec.tuning.warm_start, spec.tuning.warm_start_any_data, spec.family.name, spec.fixed,
                      spec.space, spec.objective, spec.session.data_hash, spec.store, spec.tuning.trial_limit)
    try:
        study = optuna.create_study(
            study_name=spec.study_name, storage=storage, directions=list(spec.objective.directions),
            sampler=make_sampler(spec.tuning, spec.space, spec.tuning.seed, len(spec.objective.metrics)),
            pruner=make_pruner(spec.tuning, _budget(spec)))
        study.set_metric_names(list(spec.objective.metrics))  # optuna-dashboard and Optuna's plots name them
        for prior in warm.priors if warm else ():
            study.add_trial(prior)
        for point in [*(spec.tuning.enqueue or ()), *(warm.queued if warm else ())]:
            study.enqueue_trial(point)
        if warm:
            echo(warm.describe())
    except optuna.exceptions.DuplicatedStudyError:
        # a worker joining (or resuming) a study samples with a seed of its own: workers that
        # share one seed propose the very same hyperparameters at the same time (but a Sobol
        # sequence is one sequence: its workers share its seed and take its points in turn)
        seed = spec.tuning.seed
        if seed is not None and spec.tuning.sampler != "qmc":
            seed = zlib.crc32(f"{seed}/{this_worker()}".encode())
        study = optuna.load_study(study_name=spec.study_name, storage=storage,
                                  sampler=make_sampler(spec.tuning, spec.space, seed, len(spec.objective.metrics)),
                                  pruner=make_pruner(spec.tuning, _budget(spec)))
    recorded_directions = tuple(d.name.lower() for d in study.directions)
    if recorded_directions != spec.objective.directions:
        raise ConfigError(f"study '{spec.study_name}' exists with direction(s) {', '.join(recorded_directions)}, "
                          f"not {', '.join(spec.objective.directions)}; use another --study name")
    wanted = spec.fingerprint()
    recorded = study.user_attrs.get(FINGERPRINT_ATTR)
    if recorded is None:
        study.set_user_attr(FINGERPRINT_ATTR, wanted)
        study.set_user_attr(RECIPE_ATTR, spec.recipe)
    elif recorded != wanted:
        differing = differences(recorded, wanted)
        if differing:
            raise ConfigError(f"study '{spec.study_name}' cannot resume with this command: "
                              f"{differing}; use another --study name (or the original settings)")
        study.set_user_attr(FINGERPRINT_ATTR, wanted)  # recorded by an older bnet: now in full
    return study


def _record_steps(trial: optuna.Trial, steps: int) -> None:
    """What the trial cost, for the study's budget; a trial another worker has finished
    meanwhile (its heartbeat lapsed) keeps the state that worker gave it, unrecorded."""
    try:
        trial.set_user_attr(STEPS_ATTR, steps)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass


def _exists(name: str, storage) -> bool:
    summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    return any(summary.study_name == name for summary in summaries)


class _StopRequests:
    """SIGTERM (Slurm's preemption and time-out signal) handled like Ctrl-C: the first one
    stops the running trial at its next step, a second one at once."""

    def __init__(self, echo: Echo):
        self.echo = echo
        self.requested = False

    def check(self) -> None:
        if self.requested:
            raise StudyInterrupted("SIGTERM")

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise StudyInterrupted("SIGTERM")
        self.requested = True
        self.echo("SIGTERM: stopping after the running trial's current step")

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)


def _count(study: optuna.Study) -> dict[str, int]:
    """The study's own trials by state; surplus trials (never fitted) are not failures."""
    counts = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0, "RUNNING": 0, "WAITING": 0}
    for trial in own_trials(study):
        if not trial.user_attrs.get(SURPLUS_ATTR):
            counts[trial.state.name] += 1
    return counts


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


@contextmanager
def _quiet_optuna():
    """Optuna's own log lines and experimental-feature warnings (heartbeats, grouped TPE,
    metric names) off while a study runs here: failed trials are reported with their run.
    The caller's settings are back afterwards."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            # ask/tell with a heartbeat storage: the heartbeat is bnet's own (_beating)
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def run_study(spec: StudySpec, echo: Echo = say) -> StudyOutcome:
    """Run (or resume) a study until it holds ``spec.tuning.n_trials`` finished trials."""
    spec.tuning.validate()
    with _quiet_optuna():
        return _run_study(spec, echo)


def _run_study(spec: StudySpec, echo: Echo) -> StudyOutcome:
    tracker = Tracker(spec.store)
    experiment_id = tracker.experiment(spec.experiment)
    storage = _storage(spec, tracker, echo)
    study = open_study(spec, storage, echo)
    recover_dead_trials(study, storage, tracker, echo)
    close_orphaned_runs(study, tracker)
    objective = spec.objective

    def create_parent() -> str:
        run = tracker.create_run(experiment_id, f"study {spec.study_name}",
                                 {tags.TAG_ROLE: tags.ROLE_STUDY, **spec.run_tags})
        spec.log_dataset(run)
        run.log_params({**spec.fixed,
                        **{f"search.{k}": v for k, v in spec.space.describe().items()},
                        "tuning.sampler": spec.tuning.sampler, "tuning.pruner": spec.tuning.pruner_name,
                        **({"tuning.budget_steps": spec.tuning.budget_steps} if spec.tuning.budget_steps else {}),
                        "tuning.metric": ",".join(objective.metrics),
                        "tuning.direction": ",".join(objective.directions)})
        return run.run_id

    parent = tracker.reopen(parent_run_id(study, storage, create_parent))
    loop = TrialLoop(spec, study, storage, tracker, experiment_id, parent, _wanted(spec, study, echo), echo)
    interrupted = None
    with loop.stops.installed():
        try:
            loop.run()
        except KeyboardInterrupt as err:
            interrupted = err
    if loop.stops.requested and interrupted is None:
        interrupted = StudyInterrupted("SIGTERM")
    counts = _count(study)
    comparison = _log_answer(study, parent, spec, tracker)
    if counts["COMPLETE"]:
        from bnet.plotting.report import summary_figure

        parent.log_figure(summary_figure(study, objective.metric, objective.direction), "study_summary")
    if not counts["RUNNING"]:
        # the last worker out ends the parent run; while others still fit, it stays RUNNING
        parent.terminate("KILLED" if interrupted else "FINISHED")
    refresh_statistics(spec.store)
    if interrupted:
        raise interrupted
    if loop.failed_in_a_row >= MAX_CONSECUTIVE_FAILURES:
        raise TrialsKeepFailing(
            f"study '{spec.study_name}': {loop.failed_in_a_row} trials in a row failed, so this worker stopped "
            f"(last: {loop.failures[-1] if loop.failures else 'failed by other workers'}). Finished trials are "
            f"kept; fix the cause and re-run to resume")
    front = pareto_front(study, objective) if counts["COMPLETE"] else []
    best = front[0] if front else None
    return StudyOutcome(
        study_name=spec.study_name, experiment=spec.experiment, experiment_id=experiment_id,
        parent_run_id=parent.run_id, n_complete=counts["COMPLETE"], n_pruned=counts["PRUNED"],
        n_failed=counts["FAIL"], best_trial=best.number if best else None, best_value=best.values[0] if best else None,
        best_run_id=best.user_attrs.get(MLFLOW_RUN_ATTR) if best else None, tracking_uri=spec.store.tracking_uri,
        optuna_storage=spec.store.optuna_storage, ran_now=loop.ran, metric=objective.metric,
        direction=objective.direction, failures=loop.failures,
        pareto=[ParetoPoint(t.number, t.user_attrs.get(MLFLOW_RUN_ATTR, ""), dict(zip(objective.metrics, t.values)))
                for t in front] if objective.is_multi else [],
        trivial=comparison, steps_spent=steps_spent(study), step_name=spec.family.step_name,
        budget_steps=spec.tuning.budget_steps,
    )


def steps_spent(study: optuna.Study) -> int:
    """Steps trained by every trial of the study, finished or not (a budget's account)."""
    return sum(int(t.user_attrs.get(STEPS_ATTR, 0)) for t in study.get_trials(deepcopy=False))


def _wanted(spec: StudySpec, study: optuna.Study, echo: Echo) -> int | float:
    """How many finished trials the study should hold (infinite: its budget or timeout
    decides), said with what is left to run."""
    tuning = spec.tuning
    wanted = tuning.trial_limit
    if not spec.space:
        wanted = min(wanted, 1)
        if wanted < tuning.trial_limit:
            echo("note: nothing is searched (every hyperparameter is fixed): one fit; ask for repeats on "
                 "purpose with a list of seeds, e.g. rng_seed_model: [0, 1, 2]")
    if tuning.sampler == "grid":
        wanted = min(wanted, spec.space.grid_size())
        if spec.space.grid_size() < tuning.trial_limit:
            echo(f"note: the grid has {spec.space.grid_size()} points; the study stops there")
    counts = _count(study)
    done = counts["COMPLETE"] + counts["PRUNED"]
    left = max(wanted - done, 0)
    limits = [f"{left} trial{'' if left == 1 else 's'}"] if math.isfinite(wanted) else []
    if tuning.budget_steps:
        limits.append(f"until {tuning.budget_steps:,} {spec.family.step_name}s are spent "
                      f"({steps_spent(study):,} so far)")
    if tuning.timeout:
        limits.append(f"for {tuning.timeout:g} s")
    limits = ", ".join(limits)
    if done:
        echo(f"study '{spec.study_name}' resumes with {done} finished trials; {limits} to go")
    else:
        pruner = "none (multi-objective)" if spec.objective.is_multi else tuning.pruner_name
        echo(f"study '{spec.study_name}': {limits}, sampler {tuning.sampler}, "
             f"pruner {pruner}, objective {spec.objective.describe()}")
    return wanted


class TrialLoop:
    """One worker's part of a study: ask Optuna for a trial, fit it as an MLflow run, tell
    Optuna how it ended, and decide whether to go on. Each step is one method."""

    def __init__(self, spec: StudySpec, study: optuna.Study, storage, tracker: Tracker, experiment_id: str,
                 parent: RunLogger, wanted: int | float, echo: Echo):
        self.spec, self.study, self.storage, self.tracker = spec, study, storage, tracker
        self.experiment_id, self.parent, self.echo = experiment_id, parent, echo
        self.wanted = wanted
        self.ran = 0
        self.started = time.monotonic()
        self.stops = _StopRequests(echo)
        self.failures: list[str] = []
        self.failed_in_a_row = 0
        self._waiting_said = False

    # ------------------------------------------------------------------ deciding
    def run(self) -> None:
        """Trials one at a time until the study (every worker's trials) holds ``wanted``
        finished ones; failed trials are not finished ones, so they are replaced."""
        while not self.stops.requested and self.failed_in_a_row < MAX_CONSECUTIVE_FAILURES:
            decision = self._next_step()
            if decision == "stop":
                return
            if decision == "wait":
                time.sleep(POLL_SECONDS)
                recover_dead_trials(self.study, self.storage, self.tracker, self.echo)
                continue
            try:
                self.one_trial()
            except Exception as err:
                if not is_transient(err):
                    raise
                self.echo(f"the study's database is out of reach ({str(err).splitlines()[0][:120]}); waiting")
                retry_transient(lambda: self.study.get_trials(deepcopy=False), seconds=600)
                recover_dead_trials(self.study, self.storage, self.tracker, self.echo)

    def _next_step(self) -> str:
        if self._out_of_budget():
            return "stop"
        counts = _count(self.study)
        finished = counts["COMPLETE"] + counts["PRUNED"]
        if finished >= self.wanted or (self.spec.tuning.sampler == "grid" and finished + counts["FAIL"] >= self.wanted
                                       and not counts["WAITING"] and not counts["RUNNING"]):
            return "stop"
        if finished + counts["RUNNING"] >= self.wanted:
            if not self._waiting_said:
                self.echo(f"waiting for {counts['RUNNING']} running trials of other workers")
                self._waiting_said = True
            return "wait"
        return "trial"

    def _out_of_budget(self) -> bool:
        tuning, step_name = self.spec.tuning, self.spec.family.step_name
        if tuning.timeout and time.monotonic() - self.started >= tuning.timeout:
            self.echo(f"the study's timeout of {tuning.timeout:g} s has passed: no further trial starts")
            return True
        if tuning.budget_steps:
            spent = steps_spent(self.study)
            if spent >= tuning.budget_steps:
                self.echo(f"the study's budget of {tuning.budget_steps:,} {step_name}s is spent ({spent:,} trained)")
                return True
        return False

    # ------------------------------------------------------------------ one trial
    def one_trial(self) -> None:
        """Ask Optuna for a trial, fit it while its heartbeat beats, tell Optuna how it ended.
        Trials of dead workers fail first (what Optuna's optimize loop does before each trial),
        so that a study bounded by a budget or a timeout, which never waits, retries them too."""
        recover_dead_trials(self.study, self.storage, self.tracker, self.echo)
        trial = self.study.ask()  # runs the sampler's before-trial hook
        # the worker first: a trial whose worker is known is recovered if anything below fails
        trial.set_user_attr(WORKER_ATTR, this_worker())
        trial_id = storage_id(self.storage, self.study, trial.number)
        values, surplus = None, False
        with _beating(self.storage, trial_id):
            try:
                values, state = self.evaluate(trial, trial_id), TrialState.COMPLETE
            except SurplusTrial:
                state, surplus = TrialState.FAIL, True
            except optuna.TrialPruned:
                state = TrialState.PRUNED  # Optuna keeps its last reported value
            except Exception as err:
                self.failures.append(f"trial {trial.number}: {type(err).__name__}: {err}")
                state = TrialState.FAIL
            except KeyboardInterrupt:
                self._tell(trial, trial_id, TrialState.FAIL)
                raise
            held = self._tell(trial, trial_id, state, values)
        if surplus:
            return  # never fitted: not one of this worker's trials
        self.ran += 1
        self.failed_in_a_row = self.failed_in_a_row + 1 if held == TrialState.FAIL else 0
        if held == TrialState.COMPLETE:
            _log_answer(self.study, self.parent, self.spec, self.tracker)

    def _tell(self, trial: optuna.Trial, trial_id: int, state: TrialState, values=None) -> TrialState:
        """Tell Optuna the trial's end (its sampler's after-trial hook runs) and return the
        state it holds. Another worker may have failed it meanwhile (its heartbeat lapsed, e.g.
        over a database restart) and queued a retry, which reuses this trial's finished run:
        then it keeps that state."""
        try:
            told = self.study.tell(trial, values, state=state, skip_if_finished=True)
        except optuna.exceptions.UpdateFinishedTrialError:
            told = None  # finished by another worker between tell's own check and its write
        held = self.storage.get_trial(trial_id).state
        if told is None or held != state:
            self.echo(f"trial {trial.number} was marked {held.name} by another worker while this one fitted "
                      f"it (its heartbeat lapsed); it stays {held.name}, its run as it ended here")
        return held

    def evaluate(self, trial: optuna.Trial, trial_id: int) -> float | tuple[float, ...]:
        """The trial's objective value(s): fitted as a new run, or taken from a finished run
        of the same fit. Every error, before the run exists too, is this trial's failure."""
        spec, objective = self.spec, self.spec.objective
        # straight from the database: the study's cache may hold a queued trial without the
        # attributes it was queued with (seen when this process queued it itself)
        retry_of_run = self.storage.get_trial_user_attrs(trial_id).get(RETRY_OF_RUN_ATTR)
        ahead = [t for t in own_trials(self.study, (*FINISHED_STATES, TrialState.RUNNING)) if t.number < trial.number]
        if len(ahead) >= self.wanted:
            # another worker started the last needed trial at the same moment: this one is not fitted
            trial.set_user_attr(SURPLUS_ATTR, True)
            raise SurplusTrial(f"trial {trial.number} is beyond the {self.wanted} the study needs")
        try:
            chosen = spec.space.suggest(trial)
            hparams = spec.space.resolve(chosen, spec.fixed)
            params, model_tags = spec.prepared.fitter.resolve(hparams)
            identity = FitIdentity.of(spec.family, spec.prepared, params).digest()
            same = self.tracker.find_config(self.experiment_id, identity)
        except Exception as err:
            self.echo(f"trial {trial.number} failed before its run was created: {type(err).__name__}: "
                      f"{str(err).splitlines()[0][:300]}")
            raise
        described = ", ".join(f"{k}={_short(v)}" for k, v in chosen.items())
        if same is not None and all(m in same.metrics for m in objective.metrics):
            return self._reuse(trial, same, described)
        run = self.tracker.create_run(
            self.experiment_id, run_name=f"{spec.study_name}-trial-{trial.number:03d}",
            run_tags={tags.TAG_ROLE: tags.ROLE_TRIAL, tags.TAG_TRIAL: trial.number,
                      tags.TAG_CONFIG_HASH: identity, **spec.run_tags, **model_tags,
                      **({tags.TAG_RETRY_OF: retry_of_run} if retry_of_run else {})},
            parent_run_id=self.parent.run_id,
        )
        trial.set_user_attr(MLFLOW_RUN_ATTR, run.run_id)
        self.echo(f"trial {trial.number} (run {run.run_id[:8]}) {described}")
        return self._fit(trial, run, hparams, params)

    def _reuse(self, trial: optuna.Trial, same, described: str) -> float | tuple[float, ...]:
        """A finished run of the same fit answers the trial. One of another study is
        recorded in this one as a run of its own (linked to the fitted run, whose model
        and exports it reads), so this study's queries find all of its trials."""
        source = same.artifact_run_id
        run_id = same.run_id
        if same.tags.get(tags.TAG_STUDY) != self.spec.study_name:
            run_id = self.tracker.record_reuse(
                self.experiment_id, same, f"{self.spec.study_name}-trial-{trial.number:03d}",
                {tags.TAG_ROLE: tags.ROLE_TRIAL, tags.TAG_TRIAL: trial.number, **self.spec.run_tags},
                self.parent.run_id)
        trial.set_user_attr(MLFLOW_RUN_ATTR, run_id)
        trial.set_user_attr(DUPLICATE_ATTR, source)
        self.echo(f"trial {trial.number} {described}: already fitted on this data (run {source[:8]}), not refitted")
        return self._answer(same.metrics)

    def _answer(self, metrics: dict[str, float]) -> float | tuple[float, ...]:
        objective = self.spec.objective
        values = tuple(metrics.get(m) for m in objective.metrics)
        bad = [m for m, v in zip(objective.metrics, values) if v is None or not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"the objective {bad[0]} is {metrics.get(bad[0])}")
        return values if objective.is_multi else values[0]

    def _fit(self, trial: optuna.Trial, run: RunLogger, hparams: dict[str, Any],
             params: dict[str, Any]) -> float | tuple[float, ...]:
        spec, objective, echo = self.spec, self.spec.objective, self.echo
        started = time.perf_counter()
        progress: dict[str, Progress] = {}  # one bar per stage
        steps = [0]

        def report(context: TrialContext, step: int, metrics: dict[str, float], total: int, shown: int | None,
                   state: Callable | None) -> None:
            steps[0] += context.spends_budget
            context.run.log_metrics(metrics, step=step)
            if context.stage not in progress:
                unit = context.step_name or spec.family.step_name
                label = " ".join([f"  trial {trial.number}", context.stage or spec.family.name, unit])
                progress[context.stage] = Progress(total, label, echo, unit=unit)
            progress[context.stage].update(at=step if shown is None else shown,
                                           message="  ".join(f"{k} {v:.5g}" for k, v in metrics.items()
                                                             if v is not None))
            self.stops.check()
            if not context.prunes or not objective.step_metric or objective.is_multi:
                return
            value = metrics.get(objective.step_metric)
            if value is not None and math.isfinite(value):
                trial.report(value, step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at step {step}: {objective.step_metric} {value:.5g}")

        context = TrialContext(trial.number, hparams, run, echo, report,
                               StageRuns(spec, self.tracker, self.experiment_id))
        try:
            run.log_params(params)
            spec.log_dataset(run)
            try:
                with _system_metrics(run.run_id, spec.store.tracking_uri, spec.tuning.system_metrics):
                    result = spec.prepared.fitter.fit(context)
            finally:
                _record_steps(trial, steps[0])
                for bar in progress.values():
                    bar.close()
            value = self._answer(result.metrics)
            nan = sorted(k for k, v in result.metrics.items() if isinstance(v, float) and math.isnan(v))
            if nan:
                raise FloatingPointError(f"metric {', '.join(nan)} is NaN")
            run.log_metrics(result.metrics)
            if result.model is not None:  # a pipeline's models are its stage runs'
                run.log_checkpoint(result.model, {"dataset": spec.session.dataset_id,
                                                  "data_hash": spec.session.data_hash,
                                                  **spec.prepared.run_tags, **result.checkpoint_metadata})
        except optuna.TrialPruned as pruned:
            self.tracker.close(run.run_id, "KILLED", "PRUNED", str(pruned))
            echo(f"trial {trial.number} pruned after {time.perf_counter() - started:.0f} s ({pruned})")
            raise
        except KeyboardInterrupt as stop:
            self.tracker.close(run.run_id, "KILLED", "FAIL", f"interrupted ({stop or 'Ctrl-C'})")
            if queue_retry(self.study, trial.number, trial.params, trial.user_attrs):
                echo(f"trial {trial.number} stopped; its hyperparameters are queued for the next worker")
            raise
        except Exception as err:
            reason = f"{type(err).__name__}: {err}"
            run.log_text("".join(traceback.format_exception(err)), "error.txt")
            self.tracker.close(run.run_id, "FAILED", "FAIL", reason)
            echo(f"trial {trial.number} failed: {reason.splitlines()[0][:300]}")
            _release_device_memory()
            raise
        self.tracker.close(run.run_id, "FINISHED", "COMPLETE")
        shown = "  ".join(f"{m} {v:.6g}" for m, v in zip(objective.metrics, value if objective.is_multi else [value]))
        echo(f"trial {trial.number} done in {time.perf_counter() - started:.0f} s: {shown}")
        return value


@contextmanager
def _system_metrics(run_id: str, tracking_uri: str, enabled: bool):
    """MLflow's system metrics (CPU, memory, disk, network, GPU) logged on the run while
    its trial fits, where the study asks for them."""
    if not enabled:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, tracking_uri=tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


@contextmanager
def _beating(storage, trial_id: int):
    """The trial's heartbeat while it is fitted: other workers fail a trial whose worker has
    been silent for the grace period (Optuna's heartbeat, which its optimize loop runs)."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            storage.record_heartbeat(trial_id)
            if stop.wait(storage.get_heartbeat_interval()):
                return

    thread = threading.Thread(target=beat, name=f"bnet-heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class _HeartbeatStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage whose heartbeat outlives a database restart: a beat that cannot
    reach the database is skipped, and the next one retries over a fresh connection
    (Optuna's heartbeat thread dies on its first failed write, and other workers then fail
    the trial that is still being fitted)."""

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except Exception as err:
            if not is_transient(err):
                raise


def pareto_front(study: optuna.Study, objective: Objective) -> list[optuna.trial.FrozenTrial]:
    """The study's answer: its best trial, or for a multi-objective study the Pareto front,
    ordered by the first objective."""
    # signs that make every objective a minimisation
    complete = own_trials(study, (TrialState.COMPLETE,))
    if not objective.is_multi:
        sign = 1 if objective.direction == "minimize" else -1
        return [min(complete, key=lambda t: sign * t.value)]
    return front_of(complete, objective.directions)


def front_of(trials: list[optuna.trial.FrozenTrial], directions) -> list[optuna.trial.FrozenTrial]:
    """The trials no other trial beats in every objective, ordered by the first objective."""
    signs = [1 if direction == "minimize" else -1 for direction in directions]
    scored = [(t, [s * v for s, v in zip(signs, t.values)]) for t in trials]
    front = [t for t, mine in scored
             if not any(all(o <= m for o, m in zip(other, mine)) and other != mine for _, other in scored)]
    return sorted(front, key=lambda t: signs[0] * t.values[0])


def _log_answer(study: optuna.Study, parent: RunLogger, spec: StudySpec,
                tracker: Tracker) -> TrivialComparison | None:
    """The study's answer so far on its parent run: the MLflow UI shows it without expanding.
    Returns how the best run compares with the family's trivial answer."""
    objective = spec.objective
    counts = _count(study)
    metrics = {"n_complete": counts["COMPLETE"], "n_pruned": counts["PRUNED"], "n_failed": counts["FAIL"],
               "steps_spent": steps_spent(study)}
    comparison = None
    if counts["COMPLETE"]:
        front = pareto_front(study, objective)
        best = front[0]
        metrics.update(zip(objective.metrics, best.values))
        best_run = best.user_attrs.get(MLFLOW_RUN_ATTR, "")
        comparison = spec.family.trivial(tracker.metrics(best_run)) if best_run else None
        shown = ", ".join(f"{m} {v:.4g}" for m, v in zip(objective.metrics, best.values))
        said = f"\n\n**{comparison.sentence('The best model')}.**" if comparison else ""
        # the description and tags are what the runs table and the run page show unexpanded; the
        # run keeps its name (links and searches by name hold) and the answer is a tag beside it
        parent.set_tags({"bnet.best_trial": best.number, "bnet.best_run_id": best_run,
                         tags.TAG_BEST: f"{shown} (trial {best.number})",
                         "mlflow.note.content": (
                             f"**Study `{study.study_name}`**: {counts['COMPLETE']} complete, {counts['PRUNED']} "
                             f"pruned, {counts['FAIL']} failed trials ({objective.direction} {objective.metric}).\n\n"
                             f"Best: trial {best.number}, run `{best_run}`: {shown}.{said}\n\n"
                             f"Expand this run for the trials; `bnet report {study.study_name}` writes the "
                             f"study's page (also under this run's artifacts, `report/`).")})
        if comparison is not None:
            parent.set_tags({tags.TAG_BEATS_TRIVIAL: str(comparison.beats).lower()})
        if objective.is_multi:
            metrics["pareto_size"] = len(front)
            parent.set_tags({"bnet.pareto_trials": ",".join(str(t.number) for t in front)})
            parent.log_text(json.dumps([{"trial": t.number, "run_id": t.user_attrs.get(MLFLOW_RUN_ATTR, ""),
                                         **dict(zip(objective.metrics, t.values))} for t in front], indent=1),
                            "pareto_front.json")
    parent.log_metrics(metrics)
    return comparison


def _release_device_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
