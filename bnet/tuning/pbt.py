"""Population-based training (``bnet tune ae|decoder --scheduler pbt``), by Ray Tune's
``PopulationBasedTraining`` (the optional extra ``bnet[pbt]``).

A population of members trains at once, each an MLflow run nested under the study's run.
After every ``perturbation_interval`` epochs the members wait for one another (Ray's
synchronous PBT), and the worst quarter *exploit* the best quarter: each goes on from a
better member's checkpoint (its weights, optimiser state, best epoch so far) with that
member's hyperparameters, then *explores* by multiplying the searched continuous ones
(learning rate, regularisation) by 0.8 or 1.2, or drawing them anew (p = 0.25). Searched
categorical or integer hyperparameters (the architecture) are drawn once per member and
travel with the weights.

Each member's run logs, per epoch, the family's metrics, its hyperparameters
(``hp.learning_rate``...) and a digest of the checkpoint it saved (``checkpoint_digest``);
each exploit is a metric ``pbt_exploited_from`` (the donor member) at the epoch it went on
from, with the digest of the weights it loaded (``pbt_loaded_digest``) and the donor's run in
``pbt/events.json``. The study's run holds the population's whole exploit/explore history
(``pbt_history.json``) and a figure of every member's hyperparameters over the epochs.
Checkpoints are bnet's own (a state dict and plain values, loaded with
``torch.load(weights_only=True)``); Ray keeps them under the store's ``pbt/`` folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import tempfile
import threading
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnet.config import Categorical, Range
from bnet.data.sessions import members
from bnet.errors import ConfigError
from bnet.progress import Echo, say
from bnet.tracking import conventions as tags
from bnet.tracking.runs import RunLogger
from bnet.tracking.store import Store
from bnet.tracking.tracker import Tracker
from bnet.tuning.family import PreparedStudy

CHECKPOINT_FILE = "state.pt"
RUN_ID_FILE = "bnet_run_id"
PARENT_FILE = "bnet_parent_run_id"
EVENTS_FILE = "bnet_events.json"
QUANTILE = 0.25
RESAMPLE_PROBABILITY = 0.25
PERTURBATION_FACTORS = (1.2, 0.8)
INSTALL = "pip install 'bnet[pbt]' (Ray Tune)"


def import_ray():
    try:
        import ray
        from ray import tune
    except ImportError:
        raise ConfigError(f"--scheduler pbt trains a population with Ray Tune, which is not installed: "
                          f"{INSTALL}") from None
    return ray, tune


def digest(state: dict) -> float:
    """A fingerprint of a model's weights, as a float a metric holds exactly (52 bits)."""
    hashed = hashlib.sha256()
    for name in sorted(state):
        hashed.update(name.encode())
        hashed.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return float(int(hashed.hexdigest()[:13], 16))


@dataclass
class Population:
    """What every member needs, sent to Ray's workers once (pickled, no open files)."""

    prepared: PreparedStudy
    fixed: dict[str, Any]
    space: Any  # SearchSpace
    mutable: dict[str, Range]
    store: Store
    experiment_id: str
    parent_run_id: str
    study_name: str
    run_tags: dict[str, str]
    step_metric: str
    max_epochs: int
    interval: int
    path: Path
    """The population's folder in the store (Ray's experiment folder): a member's files live in
    its trial's folder there, which a resumed population finds again."""

    def hparams(self, config: dict[str, Any]) -> dict[str, Any]:
        """A member's hyperparameters: every epoch validated and no early stop (members keep
        step with one another), the mutable ones kept within their ranges."""
        return {**self.space.resolve(within_ranges(config, self.mutable), self.fixed), "enable_early_stop": False,
                "val_check_interval": 1}


def within_ranges(config: dict[str, Any], mutable: dict[str, Range]) -> dict[str, Any]:
    """``config`` with each perturbed hyperparameter clamped to its searched range."""
    return {k: (min(max(v, mutable[k].low), mutable[k].high) if k in mutable else v) for k, v in config.items()}


def member_index(trial_id: str) -> int:
    return int(trial_id.rsplit("_", 1)[-1])


def train_member(config: dict[str, Any], population: Population) -> None:
    """One member, run by Ray (again from a checkpoint after each exploit)."""
    import torch
    from ray import tune

    from bnet.training import TrainingState
    from bnet.tuning.study import TrialContext

    torch.set_num_threads(1)  # members share the machine's cores
    context_of_ray = tune.get_context()
    index = member_index(context_of_ray.get_trial_id())
    # Ray runs a trial in a staging folder of its session; its folder in the store outlives it
    folder = population.path / Path(context_of_ray.get_trial_dir()).name
    folder.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(population.store)
    run = _member_run(tracker, population, index, folder)
    hparams = population.hparams(config)
    searched = {k: hparams[k] for k in population.space.dimensions if k in hparams}

    def report(context, step: int, metrics: dict[str, float], total: int, shown: int | None, state) -> None:
        values = {**metrics, **{f"hp.{k}": float(hparams[k]) for k in population.mutable}}
        if step + 1 >= population.max_epochs:
            # not reported to Ray: an exploit at the last epoch would retrain a member from the
            # donor's previous checkpoint only to end as its copy
            run.log_metrics(values, step=step)
            return
        if (step + 1) % population.interval:  # a checkpoint only where members may exploit (or pause)
            run.log_metrics(values, step=step)
            tune.report({population.step_metric: metrics[population.step_metric], "epoch": step, "member": index})
            return
        snapshot = state()
        weights = digest(snapshot.model)
        run.log_metrics({**values, "checkpoint_digest": weights}, step=step)
        with tempfile.TemporaryDirectory() as saved:
            torch.save({"training": snapshot.as_dict(), "run_id": run.run_id, "member": index,
                        "hparams": searched, "digest": weights}, Path(saved) / CHECKPOINT_FILE)
            tune.report({population.step_metric: metrics[population.step_metric], "epoch": step,
                         "member": index}, checkpoint=tune.Checkpoint.from_directory(saved))

    try:
        resume = None
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as saved_folder:
                saved = torch.load(Path(saved_folder) / CHECKPOINT_FILE, weights_only=True)
            resume = TrainingState.from_dict(saved["training"])
            if saved["run_id"] != run.run_id:
                _record_exploit(run, index, folder, resume, saved, searched)
        context = TrialContext(index, hparams, run, print, report, resume=resume)
        result = population.prepared.fitter.fit(context)
        params, model_tags = population.prepared.fitter.resolve(hparams)
        run.log_params(params)
        run.set_tags(model_tags)
        run.log_metrics(result.metrics)
        run.log_checkpoint(result.model, {"dataset": population.prepared.session.dataset_id,
                                          "data_hash": population.prepared.session.data_hash,
                                          **population.prepared.run_tags, **result.checkpoint_metadata})
    except Exception as err:
        run.log_text("".join(traceback.format_exception(err)), "error.txt")
        tracker.close(run.run_id, "FAILED", "FAIL", f"{type(err).__name__}: {err}")
        raise
    tracker.close(run.run_id, "FINISHED", "COMPLETE")


def _member_run(tracker: Tracker, population: Population, index: int, folder: Path) -> RunLogger:
    """The member's MLflow run: created on its first start, reopened after each exploit and
    when the population resumes."""
    recorded = folder / RUN_ID_FILE
    if recorded.exists():
        return tracker.reopen(recorded.read_text().strip())
    run = tracker.create_run(
        population.experiment_id, f"{population.study_name}-member-{index:03d}",
        {**population.run_tags, tags.TAG_ROLE: tags.ROLE_TRIAL, tags.TAG_TRIAL: index, tags.TAG_SCHEDULER: "pbt"},
        population.parent_run_id)
    for member in members(population.prepared.session):
        run.log_dataset(member.path, member.dataset_id, member.data_hash)
    recorded.write_text(run.run_id)
    return run


def _record_exploit(run: RunLogger, index: int, folder: Path, resume, saved: dict, searched: dict[str, Any]) -> None:
    """An exploit: member ``index`` goes on from another's checkpoint (its epoch ``resume.epoch``)."""
    loaded = digest(resume.model)
    events_path = folder / EVENTS_FILE
    events = json.loads(events_path.read_text()) if events_path.exists() else []
    if events and (events[-1]["epoch"], events[-1]["donor_run_id"], events[-1]["loaded_digest"]) == (
            resume.epoch, saved["run_id"], loaded):
        return  # a resumed population restarting this member from the checkpoint it had taken: no new exploit
    events.append({"member": index, "epoch": resume.epoch, "donor_member": int(saved["member"]), "donor_run_id": saved["run_id"],
                   "loaded_digest": loaded, "donor_hparams": dict(saved["hparams"]), "hparams": searched})
    events_path.write_text(json.dumps(events, indent=1))
    run.log_metrics({"pbt_exploited_from": int(saved["member"]), "pbt_loaded_digest": loaded}, step=resume.epoch)
    run.set_tags({"bnet.pbt.exploits": len(events)})
    run.log_text(json.dumps(events, indent=1), "pbt/events.json")


def _ray_domain(tune, dimension):
    if isinstance(dimension, Categorical):
        return tune.choice(list(dimension.choices))
    if dimension.is_int:
        return (tune.lograndint if dimension.log else tune.randint)(int(dimension.low), int(dimension.high) + 1)
    return (tune.loguniform if dimension.log else tune.uniform)(dimension.low, dimension.high)


def mutable_dimensions(space) -> dict[str, Range]:
    """The dimensions PBT perturbs: the continuous ranges (learning rate, regularisation)."""
    return {name: dim for name, dim in space.dimensions.items() if isinstance(dim, Range) and not dim.is_int}


def run_population(spec, echo: Echo = say):
    """Train a population (``spec.tuning.population`` members) to ``max_n_epochs`` with
    PBT; returns the study's outcome (the best member, by the family's objective)."""
    from bnet.tuning.study import StudyOutcome

    ray, tune = import_ray()
    from ray.tune.schedulers import PopulationBasedTraining
    from ray.tune.search import BasicVariantGenerator

    tuning, objective = spec.tuning, spec.objective
    if tuning.population < 2:
        raise ConfigError(f"tuning.population must be at least 2 for --scheduler pbt, got {tuning.population}")
    if objective.is_multi or not objective.step_metric:
        raise ConfigError(f"--scheduler pbt ranks members by a per-epoch metric; {objective.describe()} has none "
                          f"(use the family's objective)")
    mutable = mutable_dimensions(spec.space)
    if not mutable:
        raise ConfigError("--scheduler pbt perturbs searched continuous hyperparameters (learning_rate, l2_reg...), "
                          "but the config searches none: give one a range, e.g. learning_rate: {low: 1e-4, high: "
                          "1e-2, log: true}")
    if spec.family.budget_key in spec.space.dimensions:
        raise ConfigError(f"--scheduler pbt trains every member for the same {spec.family.budget_key}: fix it, "
                          f"do not search it")
    max_epochs = int(spec.fixed.get(spec.family.budget_key, 0))
    if max_epochs <= tuning.perturbation_interval:
        raise ConfigError(f"max_n_epochs {max_epochs} leaves no room for a perturbation every "
                          f"{tuning.perturbation_interval} epochs (tuning.perturbation_interval)")
    tracker = Tracker(spec.store)
    experiment_id = tracker.experiment(spec.experiment)
    root = Path(spec.store.root) / "pbt" if spec.store.root else Path.home() / ".bnet" / "pbt"
    path = root / spec.study_name
    resuming = (path / PARENT_FILE).exists()
    if resuming:
        parent = tracker.reopen((path / PARENT_FILE).read_text().strip())
        echo(f"population '{spec.study_name}' resumes from {path}")
    else:
        parent = tracker.create_run(experiment_id, f"study {spec.study_name}",
                                    {tags.TAG_ROLE: tags.ROLE_STUDY, tags.TAG_SCHEDULER: "pbt", **spec.run_tags})
        spec.log_dataset(parent)
        parent.log_params({**spec.fixed, **{f"search.{k}": v for k, v in spec.space.describe().items()},
                           "tuning.scheduler": "pbt", "tuning.population": tuning.population,
                           "tuning.perturbation_interval": tuning.perturbation_interval,
                           "tuning.metric": objective.metric, "tuning.direction": objective.direction})
        path.mkdir(parents=True, exist_ok=True)
        (path / PARENT_FILE).write_text(parent.run_id)
        echo(f"population '{spec.study_name}': {tuning.population} members, {max_epochs} epochs each, "
             f"exploit/explore every {tuning.perturbation_interval} epochs on {objective.step_metric} "
             f"({objective.direction}), perturbing {', '.join(mutable)}")
    population = Population(spec.prepared, spec.fixed, spec.space, mutable, spec.store, experiment_id,
                            parent.run_id, spec.study_name, spec.run_tags, objective.step_metric, max_epochs,
                            tuning.perturbation_interval, path)
    mode = "min" if objective.direction == "minimize" else "max"

    scheduler = PopulationBasedTraining(
        time_attr="training_iteration", perturbation_interval=tuning.perturbation_interval,
        hyperparam_mutations={k: _ray_domain(tune, dim) for k, dim in mutable.items()},
        quantile_fraction=QUANTILE, resample_probability=RESAMPLE_PROBABILITY,
        perturbation_factors=PERTURBATION_FACTORS, custom_explore_fn=lambda config: within_ranges(config, mutable),
        synch=True)
    random.seed(tuning.seed)  # PBT's exploit and explore draws are Python's random
    trainable = tune.with_parameters(train_member, population=population)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # bnet's progress lines, not Ray's tables
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=min(tuning.population, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=False, logging_level="ERROR")
    interrupted = None
    try:
        if resuming and tune.Tuner.can_restore(str(path)):
            tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, restart_errored=False)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={k: _ray_domain(tune, dim) for k, dim in spec.space.dimensions.items()},
                tune_config=tune.TuneConfig(metric=objective.step_metric, mode=mode, scheduler=scheduler,
                                            num_samples=tuning.population,
                                            search_alg=BasicVariantGenerator(random_state=tuning.seed)),
                run_config=tune.RunConfig(name=spec.study_name, storage_path=str(root), verbose=0,
                                          # a member's latest checkpoint is all PBT reads
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=4),
                                          callbacks=[progress_callback(echo, objective.step_metric, max_epochs)]))
        with warnings.catch_warnings(), _sigterm_as_interrupt():
            # Ray suggests reusing actors: that needs a class trainable; a member's restart is ~1 s
            warnings.filterwarnings("ignore", message="Consider boosting PBT performance")
            results = tuner.fit()
    except KeyboardInterrupt as err:
        interrupted = err
    except Exception:
        parent.terminate("FAILED")
        raise
    finally:
        if started_ray:
            ray.shutdown()  # its processes too: a killed driver leaves them running
    if interrupted is not None:
        for member in _members(tracker, spec, experiment_id, "RUNNING"):  # reopened when it resumes
            tracker.close(member.run_id, "KILLED", "FAIL", "interrupted: the same command resumes the population")
        parent.terminate("KILLED")
        raise interrupted
    failures = [f"member {(r.metrics or {}).get('member', '?')}: {type(r.error).__name__}: {r.error}".splitlines()[0]
                for r in results if r.error]
    members = _members(tracker, spec, experiment_id, "FINISHED")
    history = pbt_history(path)
    parent.log_text(json.dumps(history, indent=1), "pbt_history.json")
    figure = plot_population(tracker, members, mutable, history)
    if figure is not None:
        parent.log_figure(figure, "pbt_hyperparameters")
    sign = 1 if objective.direction == "minimize" else -1
    ranked = sorted((r for r in members if math.isfinite(r.metrics.get(objective.metric, math.nan))),
                    key=lambda r: sign * r.metrics[objective.metric])
    best = ranked[0] if ranked else None
    comparison = spec.family.trivial(best.metrics) if best else None
    parent.log_metrics({"n_complete": len(members), "n_failed": len(failures), "pbt_exploits": len(history),
                        **({objective.metric: best.metrics[objective.metric]} if best else {})})
    if best:
        parent.set_tags({"bnet.best_run_id": best.run_id,
                         tags.TAG_BEST: f"{objective.metric} {best.metrics[objective.metric]:.4g} "
                                        f"(member {best.tags.get(tags.TAG_TRIAL)})",
                         **({tags.TAG_BEATS_TRIVIAL: str(comparison.beats).lower()} if comparison else {})})
    parent.terminate("FINISHED")
    return StudyOutcome(
        study_name=spec.study_name, experiment=spec.experiment, experiment_id=experiment_id,
        parent_run_id=parent.run_id, n_complete=len(members), n_pruned=0, n_failed=len(failures),
        best_trial=int(best.tags[tags.TAG_TRIAL]) if best else None,
        best_value=best.metrics[objective.metric] if best else None, best_run_id=best.run_id if best else None,
        tracking_uri=spec.store.tracking_uri, optuna_storage=str(path), ran_now=tuning.population,
        metric=objective.metric, direction=objective.direction, failures=failures, trivial=comparison,
        steps_spent=tuning.population * max_epochs, step_name=spec.family.step_name)


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (Slurm's time-out, ``kill``) stops the population like Ctrl-C: Ray saves where
    each member is, its processes are shut down, and the same command resumes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _members(tracker: Tracker, spec, experiment_id: str, status: str) -> list:
    from bnet.tracking.query import RunSummary, trial_filter

    runs = tracker.client.search_runs([experiment_id], max_results=10_000, filter_string=(
        f"{trial_filter(spec.family.name, spec.study_name)} and attributes.status = '{status}'"))
    return [RunSummary.from_run(run) for run in runs]


def pbt_history(path: Path) -> list[dict[str, Any]]:
    """Every exploit of the population, as its members recorded them (from the checkpoints
    they went on from): which member took which member's state at which epoch, with the
    hyperparameters before (the donor's) and after exploring, in epoch order."""
    events = []
    for recorded in path.glob(f"*/{EVENTS_FILE}"):
        events += json.loads(recorded.read_text())
    return sorted(events, key=lambda event: (event["epoch"], event["member"]))


def plot_population(tracker: Tracker, members, mutable: dict[str, Range], history: list[dict[str, Any]]):
    """Each member's hyperparameters over the epochs, its exploits marked."""
    import matplotlib.pyplot as plt

    if not members:
        return None
    figure, axes = plt.subplots(len(mutable), 1, figsize=(8, 2.6 * len(mutable)), squeeze=False, sharex=True)
    colours = plt.get_cmap("tab10")
    for row, (name, dimension) in enumerate(mutable.items()):
        ax = axes[row][0]
        for run in members:
            member = int(run.tags[tags.TAG_TRIAL])
            points = sorted((m.step, m.value) for m in tracker.client.get_metric_history(run.run_id, f"hp.{name}"))
            if points:
                ax.plot(*zip(*points), color=colours(member % 10), label=f"member {member}", drawstyle="steps-post")
        for event in history:
            value = event["hparams"].get(name)
            if value is not None:  # the first epoch trained with the explored value
                ax.scatter([event["epoch"] + 1], [value], marker="o", facecolors="none", edgecolors="black", zorder=3)
                ax.annotate(f"{event['member']} from {event['donor_member']}", (event["epoch"] + 1, value),
                            fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_ylabel(name)
        if dimension.log:
            ax.set_yscale("log")
    axes[0][0].set_title("each member's hyperparameters (circles: member M went on from member D's checkpoint, "
                         "then explored)", fontsize=9)
    axes[0][0].legend(fontsize=7, ncol=4)
    axes[-1][0].set_xlabel("epoch")
    figure.tight_layout()
    return figure


def progress_callback(echo: Echo, metric: str, max_epochs: int):
    """A Ray Tune callback turning members' results into bnet's progress lines, one per member
    and epoch (members' own output stays in their Ray logs). Made here: Ray is imported only
    where a population trains."""
    from ray.tune import Callback

    class Progress(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if metric in result:
                echo(f"  member {member_index(trial.trial_id)} epoch {int(result['epoch']) + 1}/{max_epochs}  "
                     f"{metric} {result[metric]:.5g}")

        def on_trial_error(self, iteration, trials, trial, **info):
            echo(f"member {member_index(trial.trial_id)} failed (its run says why)")

    return Progress()
