"""Search efficiency: how many training epochs each search method needs to find a model as
good as BehaveNet's full grid, and whether the model it picks is as good on held-out data.

Budget is counted in **epochs trained** (what compute costs), not trials: a pruned trial
costs the epochs before its cut, an early-stopped one the epochs it ran.

Two fixed problems, each a search space and a grid over a discretisation of it (what a
BehaveNet user writes in its JSON lists):

* ``ae``: a synthetic session with known latents (``bnet.data.synthesize``); searched:
  ``n_ae_latents`` in {4, 8, 12, 16}, ``learning_rate`` and ``l2_reg`` on log scales, and
  the architecture (``ae_n_conv_layers``). Objective: validation MSE (minimised).
* ``decoder``: the real macaque M1 recording in ``../shared/data/spykesml_m1_s1`` (spikes to
  hand velocity); searched: ``n_lags``, ``n_hid_layers``, ``n_hid_units`` (with hidden
  layers only), ``learning_rate``, ``l2_reg``. Objective: validation R² (maximised).

BehaveNet's way runs first: every grid point to its full epoch budget; its best validation
value is the reference, the epochs it took the denominator. Then, for each seed, each method
runs until it has spent half the grid's epochs, with the samplers and pruners exactly as
``bnet tune`` builds them (``make_sampler``, ``make_pruner``):

* ``grid`` - the grid's own fits in a random order (no refitting: it is the same compute);
* ``random``, ``tpe``, ``tpe+median``, ``tpe+hyperband``, ``gp``, ``cmaes`` (ranges by CMA-ES,
  categorical dimensions at random); on request ``qmc`` and ``tpe-independent``
  (univariate TPE, to measure what multivariate TPE buys).

Every fit uses the same model seed, batch order and data, so one configuration gives one
answer whichever method asks for it. Printed per method: the epochs to come within 1% of
the grid's best (median over seeds, and in how many seeds at all), the best validation
value after 10%, 25% and 50% of the grid's epochs (median [quartiles]), and the test value
of the model each method would pick at 25% and 50% beside the grid's pick. A convergence
plot (best value vs epochs, median and quartiles) is saved as a PNG.

Two more compare whole studies run by ``bnet.tune`` (MLflow, Optuna, Ray), not a grid:

* ``pipeline``: ``bnet tune pipeline`` on a synthetic session with known states, searched by
  the downstream ARHMM's held-out log-likelihood against the same trials searched by
  reconstruction alone (the stage-wise champion): each pick's reconstruction, downstream
  scores and state accuracy against the generator's states.
* ``pbt``: ``--scheduler pbt`` against TPE + Hyperband at the same epoch budget (population x
  epochs) on the AE problem's session: the best validation and test loss each finds.

    python bench/search_efficiency.py [--problems ae decoder pipeline pbt] [--seeds 5] [--epochs N]
        [--methods ...] [--trials 8] [--population 4] [--out bench/out]

The small setting (the defaults) takes about 30 minutes on 2 cores, nearly all of it the six
trained methods x 5 seeds x half a grid each; ``--seeds 2 --methods grid tpe+hyperband`` gives
a first look in a few minutes, ``--size large`` doubles the data and the epochs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np
import optuna
import torch

from bnet.config import Categorical, ProjectConfig, Range, TuningConfig
from bnet.data import SynthConfig, read_ground_truth, synthesize
from bnet.data.m1 import build_m1_session
from bnet.training import EpochRecord, evaluate_terms, fit
from bnet.tracking.store import resolve_store
from bnet.tuning.family import StudyRequest, get_family, merged_values
from bnet.tuning.space import Condition, SearchSpace
from bnet.tuning.samplers import make_pruner, make_sampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arhmm_science import matched_accuracy  # noqa: E402
from machine import describe  # noqa: E402  (the machine the figures were taken on)

SHARED = Path(__file__).resolve().parents[2] / "shared"
M1 = SHARED / "data" / "spykesml_m1_s1" / "m1_stevenson_2011.mat"
METHODS = ("grid", "random", "tpe", "tpe+median", "tpe+hyperband", "gp", "cmaes")
OPTIONAL_METHODS = ("qmc", "tpe-independent")
CHECKPOINTS = (0.10, 0.25, 0.50)
WITHIN = 0.01


@dataclass
class Fit:
    """One configuration's training: its validation value per epoch, its final (best
    epoch's) validation and test values, and the epochs it trained."""

    curve: list[float]
    val: float
    test: float

    @property
    def epochs(self) -> int:
        return len(self.curve)


class Pruned(Exception):
    pass


@dataclass
class Problem:
    """A search space, its grid and a way to fit one point of it."""

    name: str
    direction: str
    metric: str
    space: SearchSpace
    grid: list[dict]
    fixed: dict
    fitter: object
    epochs: int
    cache: dict = field(default_factory=dict)

    def better(self, a: float, b: float) -> bool:
        return a > b if self.direction == "maximize" else a < b

    def close_enough(self, value: float, best: float) -> bool:
        """Within 1% of the grid's best, on the objective's own scale."""
        slack = WITHIN * abs(best)
        return value >= best - slack if self.direction == "maximize" else value <= best + slack

    def fit(self, hparams: dict, on_epoch=None) -> Fit:
        """The fit of one point; ``on_epoch(epoch, value)`` may raise :class:`Pruned`.

        Unpruned fits are remembered: a method that asks for a point already fitted pays its
        epochs again (the compute a real study spends) without this process redoing them.
        A pruned fit's epochs are replayed from a remembered full fit where there is one."""
        key = tuple(sorted((k, round(v, 12) if isinstance(v, float) else v) for k, v in hparams.items()))
        if key in self.cache:
            known = self.cache[key]
            for epoch, value in enumerate(known.curve):
                if on_epoch:
                    on_epoch(epoch, value)
            return known
        done = self.fitter(self.space.resolve(hparams, self.fixed), on_epoch)
        self.cache[key] = done
        return done


# ----------------------------------------------------------------------------- problems

def ae_problem(root: Path, size: str, epochs: int | None, session_seed: int = 11) -> Problem:
    large = size == "large"
    pixels = 32 if large else 24
    data = synthesize(root / f"ae{session_seed}.hdf5", SynthConfig(n_trials=40 if large else 12, n_frames=40, y_pixels=pixels,
                                                    x_pixels=pixels, n_latents=8, n_neurons=0, seed=session_seed))
    epochs = epochs or (40 if large else 20)
    dims = {"n_ae_latents": Categorical((4, 8, 12, 16)),
            "learning_rate": Range(1e-4, 1e-2, log=True),
            "l2_reg": Range(1e-6, 1e-2, log=True),
            "ae_n_conv_layers": Categorical((2, 3))}
    grid_values = {"n_ae_latents": [4, 8, 12, 16], "learning_rate": [1e-4, 1e-3, 1e-2],
                   "l2_reg": [1e-6, 1e-3], "ae_n_conv_layers": [2, 3]}
    fixed = {"model_class": "ae", "model_type": "conv", "ae_first_channels": 8, "ae_kernel_size": 5,
             "max_n_epochs": epochs, "min_n_epochs": epochs // 2, "early_stop_history": 5, "batch_size": 40,
             "rng_seed_model": 0, "rng_seed_train": 0, "precision": "fp32", "device": "cpu"}
    trials, space, fixed = _prepared("ae", data, fixed | dims, {})

    def fit_ae(hparams, on_epoch):
        model_config, training, _ = trials.configs(hparams)
        _, batches = trials.batches(hparams, model_config, training.batch_size)
        model, _ = trials.initial_model(model_config, batches)
        curve = []

        class Report:
            def on_epoch_end(self, record: EpochRecord):
                curve.append(record.val_loss)
                if on_epoch:
                    on_epoch(record.epoch, record.val_loss)

        result = fit(model, batches["train"], batches["val"], training, weight_decay=model_config.l2_reg,
                     precision="fp32", callbacks=[Report()])
        return Fit(curve, result.best_val_loss, evaluate_terms(model, batches["test"], torch.device("cpu"))["loss"])

    return Problem("ae", "minimize", "val MSE", space, _grid(grid_values), fixed, fit_ae, epochs)


def decoder_problem(root: Path, size: str, epochs: int | None) -> Problem:
    if not M1.is_file():
        raise SystemExit(f"{M1}: the M1 recording is not there (../shared/data beside the project)")
    large = size == "large"
    data = build_m1_session(M1, root / "m1.hdf5", trial_frames=100, max_trials=None if large else 40)
    epochs = epochs or (40 if large else 20)
    dims = {"n_lags": Categorical((0, 4)), "n_hid_layers": Categorical((0, 1, 2)),
            "n_hid_units": Categorical((32, 128)),
            "learning_rate": Range(1e-4, 1e-2, log=True), "l2_reg": Range(1e-6, 1e-1, log=True)}
    conditions = {"n_hid_units": Condition("n_hid_layers", lambda v: int(v) > 0, 0, "n_hid_layers > 0")}
    grid_values = {"n_lags": [0, 4], "n_hid_layers": [0, 1, 2], "n_hid_units": [32, 128],
                   "learning_rate": [1e-4, 1e-3, 1e-2], "l2_reg": [1e-5, 1e-3]}
    fixed = {"model_class": "neural-labels", "max_n_epochs": epochs, "min_n_epochs": epochs // 2,
             "early_stop_history": 5, "rng_seed_model": 0, "rng_seed_train": 0, "device": "cpu",
             "trial_splits": "8;1;1;0"}
    trials, space, fixed = _prepared("decoder", data, fixed | dims, conditions, target="labels")

    def fit_decoder(hparams, on_epoch):
        model_config, training, _ = trials.configs(hparams)
        model = trials.initial_model(model_config)
        curve = []

        class Report:
            def on_epoch_end(self, record: EpochRecord):
                curve.append(trials.score(model, "val"))
                if on_epoch:
                    on_epoch(record.epoch, curve[-1])

        fit(model, trials.batches["train"], trials.batches["val"], training, weight_decay=model_config.l2_reg,
            precision="fp32", callbacks=[Report()])
        return Fit(curve, trials.score(model, "val"), trials.score(model, "test"))

    grid = [point for point in _grid(grid_values) if point["n_hid_layers"] or point["n_hid_units"] == 32]
    for point in grid:
        if not point["n_hid_layers"]:
            del point["n_hid_units"]
    return Problem("decoder", "maximize", "val R²", space, grid, fixed, fit_decoder, epochs)


def _prepared(family: str, data: Path, values: dict, conditions: dict, target: str | None = None):
    """The family's own trials over ``data`` (its configs, batches and scores) as ``bnet tune``
    prepares them, the space and the fixed values (the family's defaults filled in)."""
    declared = get_family(family)
    merged, _ = merged_values(declared, ProjectConfig(values=values))
    store = resolve_store(data.parent / f"store-{data.stem}")
    space, fixed = SearchSpace.split(merged, conditions)
    request = StudyRequest(data, merged, {}, {"target": target} if target else {})
    return declared.prepare(request, store)[0].fitter, space, fixed


def _grid(values: dict[str, list]) -> list[dict]:
    names = list(values)
    return [dict(zip(names, point)) for point in itertools.product(*values.values())]


# ----------------------------------------------------------------------------- methods

@dataclass
class Trace:
    """One method's run: after each trial, the epochs spent so far and the best
    validation value so far with its model's test value (None before any finished fit)."""

    epochs: list[int] = field(default_factory=list)
    best: list[float | None] = field(default_factory=list)
    test: list[float | None] = field(default_factory=list)

    def record(self, spent: int, best: float | None, test: float | None) -> None:
        self.epochs.append(spent)
        self.best.append(best)
        self.test.append(test)

    def at(self, epochs: float) -> tuple[float | None, float | None]:
        """The best value and its test value once ``epochs`` had been spent."""
        best = test = None
        for spent, value, held_out in zip(self.epochs, self.best, self.test):
            if spent > epochs:
                break
            best, test = value, held_out
        return best, test

    def epochs_to(self, problem: Problem, target: float) -> int | None:
        for spent, value in zip(self.epochs, self.best):
            if value is not None and problem.close_enough(value, target):
                return spent
        return None


def grid_in_random_order(problem: Problem, grid_fits: list[Fit], seed: int) -> Trace:
    trace, spent, best, test = Trace(), 0, None, None
    for index in np.random.default_rng(seed).permutation(len(grid_fits)):
        done = grid_fits[index]
        spent += done.epochs
        if best is None or problem.better(done.val, best):
            best, test = done.val, done.test
        trace.record(spent, best, test)
    return trace


def search(problem: Problem, method: str, seed: int, budget: int,
           queued: list[dict] = ()) -> tuple[Trace, optuna.Study]:
    """One Optuna study of ``method`` (bnet's own sampler and pruner) until it has spent
    ``budget`` epochs, fitting the ``queued`` points first (a warm start from other data)."""
    sampler_name, _, pruner_name = method.partition("+")
    tuning = TuningConfig(sampler="tpe" if sampler_name == "tpe-independent" else sampler_name,
                          pruner=pruner_name or "none", budget_steps=budget, seed=seed)
    sampler = make_sampler(tuning, problem.space, seed)
    if sampler_name == "tpe-independent":
        # Optuna 5's TPE is multivariate unless told otherwise
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=10, multivariate=False)
    # a fixed name: Hyperband assigns trials to its brackets by a hash of the study's name
    study = optuna.create_study(study_name=f"{problem.name}-{method}-{seed}", direction=problem.direction,
                                sampler=sampler,
                                pruner=make_pruner(tuning, problem.epochs))
    for point in queued:
        study.enqueue_trial(point)
    trace, spent, best, test = Trace(), 0, None, None
    while spent < budget:
        trial = study.ask()
        chosen = problem.space.suggest(trial)
        trained = [0]

        def on_epoch(epoch, value):
            trained[0] = epoch + 1
            trial.report(value, epoch)
            if trial.should_prune():
                raise Pruned

        try:
            done = problem.fit(chosen, on_epoch)
        except Pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            spent += trained[0]
            trace.record(spent, best, test)
            continue
        study.tell(trial, done.val)
        spent += done.epochs
        if best is None or problem.better(done.val, best):
            best, test = done.val, done.test
        trace.record(spent, best, test)
    return trace, study


def top_points(study: optuna.Study, problem: Problem, n: int = 5) -> list[dict]:
    """A study's best configurations, best first: what ``--warm-start`` queues."""
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    return [t.params for t in sorted(complete, key=lambda t: t.value, reverse=problem.direction == "maximize")[:n]]


def warm_start_gain(root: Path, args, method: str, sources: list[optuna.Study], grid_epochs: int) -> list[str]:
    """A study of ``method`` on a second synthetic session (another seed of the generator),
    cold and warm-started with the best configurations of the same method's study on the
    first (configurations only: the data differ), for each seed."""
    second = ae_problem(root, args.size, args.epochs, session_seed=12)
    budget = grid_epochs // 4
    cold = [search(second, method, seed, budget)[0] for seed in range(args.seeds)]
    warm = [search(second, method, seed, budget, top_points(source, second))[0]
            for seed, source in zip(range(args.seeds), sources)]
    lines = [f"## warm start: {method} on a second synthetic session (generator seed 12), cold vs warm-started "
             f"from its study on the first ({args.seeds} seeds, budget {budget:,} epochs)", "",
             "| start | best at 5% of the first grid's epochs | at 10% | at 25% | epochs to the cold start's final "
             "best (median over seeds; seeds that got there) |", "| --- | --- | --- | --- | --- |"]
    targets = [c.best[-1] for c in cold]
    for name, runs in (("cold", cold), ("warm", warm)):
        at = [quartiles([v for t in runs if (v := t.at(share * grid_epochs)[0]) is not None])
              for share in (0.05, 0.10, 0.25)]
        reach = [next((e for e, v in zip(t.epochs, t.best) if v is not None and not second.better(target, v)), None)
                 for t, target in zip(runs, targets)]
        median = np.median([math.inf if r is None else r for r in reach])
        lines.append(f"| {name} | " + " | ".join(at) + f" | {int(median) if math.isfinite(median) else 'not reached'} "
                     f"({sum(r is not None for r in reach)}/{len(runs)}) |")
    return lines


# ----------------------------------------------------------------------------- report

def quartiles(values: list[float]) -> str:
    if not values:
        return "-"
    q1, q2, q3 = np.percentile(values, [25, 50, 75])
    return f"{q2:.4g} [{q1:.4g}, {q3:.4g}]"


def report(problem: Problem, grid_fits: list[Fit], traces: dict[str, list[Trace]], seconds: float) -> list[str]:
    grid_epochs = sum(f.epochs for f in grid_fits)
    best_fit = (max if problem.direction == "maximize" else min)(grid_fits, key=lambda f: f.val)
    lines = [f"## {problem.name}: {problem.metric} ({problem.direction}), {len(grid_fits)} grid points, "
             f"{grid_epochs:,} grid epochs, {len(next(iter(traces.values())))} seeds",
             f"grid (BehaveNet): best {problem.metric} {best_fit.val:.4g}, its test value {best_fit.test:.4g} "
             f"({seconds:.0f} s to fit the grid)",
             "",
             "| method | epochs to within 1% of the grid's best (median over seeds; seeds that got there) | "
             + " | ".join(f"best at {int(c * 100)}% of the grid's epochs" for c in CHECKPOINTS)
             + " | test of the pick at 25% | test of the pick at 50% |",
             "| --- | --- | " + " | ".join("---" for _ in CHECKPOINTS) + " | --- | --- |"]
    for method, runs in traces.items():
        # the median over every seed, a seed that never got there counting as never
        reached = [t.epochs_to(problem, best_fit.val) for t in runs]
        hits = sum(r is not None for r in reached)
        median = np.median([math.inf if r is None else r for r in reached])
        to_target = (f"{median / grid_epochs:.0%} ({int(median):,}); {hits}/{len(runs)}" if math.isfinite(median)
                     else f"not reached; {hits}/{len(runs)}")
        at = [[t.at(c * grid_epochs) for t in runs] for c in CHECKPOINTS]
        bests = [quartiles([b for b, _ in row if b is not None]) for row in at]
        tests = [quartiles([t for _, t in row if t is not None]) for row in at[1:]]
        lines.append(f"| {method} | {to_target} | " + " | ".join(bests) + " | " + " | ".join(tests) + " |")
    return lines


def plot(problems: list[Problem], grid: dict[str, list[Fit]], traces: dict[str, dict[str, list[Trace]]],
         path: Path) -> None:
    """Per problem, the best value so far as its gap to the grid's best (relative, log
    scale; at or beyond the grid's best it is drawn at the floor), median and quartiles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-4
    fig, axes = plt.subplots(1, len(problems), figsize=(6.5 * len(problems), 4.5), squeeze=False)
    for ax, problem in zip(axes[0], problems):
        grid_epochs = sum(f.epochs for f in grid[problem.name])
        best = (max if problem.direction == "maximize" else min)(f.val for f in grid[problem.name])
        sign = -1 if problem.direction == "maximize" else 1
        xs = np.linspace(0, 0.5, 101)[1:]
        for method, runs in traces[problem.name].items():
            gaps = np.array([[np.nan if (v := t.at(x * grid_epochs)[0]) is None
                              else max(sign * (v - best) / abs(best), floor) for x in xs] for t in runs])
            shown = ~np.all(np.isnan(gaps), axis=0)
            with np.errstate(all="ignore"):
                quarters = np.nanpercentile(gaps[:, shown], [25, 50, 75], axis=0)
            line, = ax.plot(xs[shown] * 100, quarters[1], label=method)
            ax.fill_between(xs[shown] * 100, quarters[0], quarters[2], color=line.get_color(), alpha=0.12)
        ax.axhline(WITHIN, color="k", lw=1, ls="--", label="within 1% of the grid's best")
        ax.set_yscale("log")
        ax.set_xlabel("epochs spent, % of the full grid's")
        ax.set_ylabel(f"gap of the best {problem.metric} to the grid's best")
        ax.set_title(f"{problem.name}: median and quartiles over seeds")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------- pipeline and population studies

def _quiet(message: str) -> None:
    pass


def _trial_runs(store, experiment: str, family: str, role: str = "trial") -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store.tracking_uri)
    found = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([found.experiment_id], max_results=5000)
            if r.data.tags.get("bnet.role") == role and r.data.tags.get("bnet.family") == family
            and r.info.status == "FINISHED"]


def _stage_state_accuracy(store, trial_run, data: Path, n_states: int) -> float:
    """Held-out (test trials) accuracy of the trial's ARHMM stage against the generator's states."""
    from mlflow.tracking import MlflowClient

    from bnet.data.exports import read_export

    client = MlflowClient(store.tracking_uri)
    (stage,) = [r for r in client.search_runs([trial_run.info.experiment_id], max_results=5000)
                if r.data.tags.get("bnet.pipeline_run_id") == trial_run.info.run_id
                and r.data.tags.get("bnet.stage") == "arhmm"]
    with tempfile.TemporaryDirectory() as tmp:
        states, splits = read_export(client.download_artifacts(stage.info.run_id, "exports/states.hdf5", tmp), "states")
    truth = dict(zip(sorted(states), read_ground_truth(data, "states", sorted(states))))
    test = list(splits.test)
    return matched_accuracy(np.concatenate([truth[t] for t in test]), np.concatenate([states[t] for t in test]),
                            n_states, n_states)


def pipeline_vs_stagewise(root: Path, seeds: int, n_trials: int, epochs: int) -> list[str]:
    """The same pipeline trials searched two ways, at the same compute (``n_trials`` AEs, each
    with the same downstream stages): by reconstruction alone (what BehaveNet and every peer
    pick: the stage-wise champion) and by the downstream ARHMM's held-out log-likelihood of
    the whitened latents (``bnet tune pipeline --metric arhmm_val_ll_per_step``). Each pick is
    reported by its reconstruction, its downstream scores and how well its ARHMM's states
    match the generator's on the test trials."""
    from bnet.tuning.tune import tune

    n_states = 4
    data = synthesize(root / "pipeline.hdf5", SynthConfig(n_trials=32, n_frames=50, y_pixels=24, x_pixels=24,
                                                          n_latents=4, n_states=n_states, n_neurons=30, seed=5))
    values = {"model_class": "ae", "model_type": "conv", "ae_first_channels": 8, "ae_kernel_size": 5,
              "n_ae_latents": Categorical((2, 4, 8)), "learning_rate": Range(1e-4, 3e-3, log=True),
              "l2_reg": Range(1e-6, 1e-3, log=True), "max_n_epochs": epochs, "min_n_epochs": epochs // 2,
              "early_stop_history": 5, "batch_size": 50, "precision": "fp32", "device": "cpu",
              "export_train_plots": False, "n_arhmm_states": n_states, "arhmm_n_iters": 40,
              "decoder_n_lags": 2, "decoder_max_n_epochs": 40, "decoder_learning_rate": 3e-3}
    store = resolve_store(root / "pipeline-store")
    picks: dict[str, list[dict]] = {"stage-wise (ae_best_val_loss)": [], "pipeline (arhmm_val_ll_per_step)": []}
    every_trial: list[dict] = []
    for seed in range(seeds):
        for (label, rows), metric in zip(picks.items(), ("ae_best_val_loss", "arhmm_val_ll_per_step")):
            experiment = f"pipeline-{metric}-{seed}"
            started = time.perf_counter()
            tune("pipeline", data, experiment, ProjectConfig(experiment, dict(values)), n_trials=n_trials, seed=seed,
                 metric=metric, store=store, echo=_quiet)
            runs = _trial_runs(store, experiment, "pipeline")
            scored = {}
            for run in runs:
                scored[run.info.run_id] = {k: run.data.metrics[k] for k in (
                    "ae_best_val_loss", "ae_test_var_explained", "arhmm_val_ll_per_step", "arhmm_test_ll_per_step",
                    "decoder_test_r2")}
                scored[run.info.run_id]["state_accuracy"] = _stage_state_accuracy(store, run, data, n_states)
                scored[run.info.run_id]["n_ae_latents"] = int(run.data.params["n_ae_latents"])
            every_trial += scored.values()
            sign = 1 if metric == "ae_best_val_loss" else -1
            pick = min(runs, key=lambda r: sign * r.data.metrics[metric])
            row = scored[pick.info.run_id]
            rows.append(row)
            print(f"  pipeline seed {seed} {label}: {json.dumps(row)} ({time.perf_counter() - started:.0f} s)",
                  flush=True)
    lines = [f"## Pipeline study against stage-wise selection ({seeds} seeds x {n_trials} trials of {epochs} "
             f"epochs each way, the same downstream stages; medians [quartiles] of each pick, on the test trials)",
             "", "| pick | AE val loss | AE test var. explained | ARHMM test ll / step / whitened dim | "
             "decoder test R² (whitened) | state accuracy vs truth | latents |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, rows in picks.items():
        cells = [quartiles([r[k] for r in rows]) for k in ("ae_best_val_loss", "ae_test_var_explained",
                                                           "arhmm_test_ll_per_step", "decoder_test_r2",
                                                           "state_accuracy")]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {sorted(r['n_ae_latents'] for r in rows)} |")
    stagewise, joint = picks.values()
    better = sum(j["arhmm_test_ll_per_step"] > s["arhmm_test_ll_per_step"] for s, j in zip(stagewise, joint))
    lines += ["", f"The pipeline's pick had the better held-out ARHMM score in {better} of {seeds} seeds."]
    # does the whitened score follow the truth, within a latent count and across counts?
    from scipy.stats import spearmanr

    truth = [t["state_accuracy"] for t in every_trial]
    lines += ["", f"Over all {len(every_trial)} trials, Spearman's rank correlation with the ARHMM's state accuracy "
              f"against the generator's states: ARHMM val ll / step / whitened dim "
              f"{spearmanr([t['arhmm_val_ll_per_step'] for t in every_trial], truth)[0]:.2f}, AE val loss "
              f"(negated) {spearmanr([-t['ae_best_val_loss'] for t in every_trial], truth)[0]:.2f}.", "",
              "| latents | trials | ARHMM val ll / step / whitened dim | state accuracy | AE test var. explained |",
              "| --- | --- | --- | --- | --- |"]
    for count in sorted({t["n_ae_latents"] for t in every_trial}):
        group = [t for t in every_trial if t["n_ae_latents"] == count]
        within = spearmanr([t["arhmm_val_ll_per_step"] for t in group], [t["state_accuracy"] for t in group])[0] \
            if len(group) > 2 else float("nan")
        lines.append(f"| {count} | {len(group)} (rank correlation within: {within:.2f}) | "
                     f"{quartiles([t['arhmm_val_ll_per_step'] for t in group])} | "
                     f"{quartiles([t['state_accuracy'] for t in group])} | "
                     f"{quartiles([t['ae_test_var_explained'] for t in group])} |")
    return lines


def pbt_vs_tpe(root: Path, seeds: int, population: int, epochs: int, interval: int) -> list[str]:
    """PBT against TPE with Hyperband at the same epoch budget (``population x epochs``) on the
    AE problem's synthetic session: the best validation and test loss each finds."""
    from bnet.tuning.tune import tune

    data = synthesize(root / "pbt.hdf5", SynthConfig(n_trials=12, n_frames=40, y_pixels=24, x_pixels=24,
                                                     n_latents=8, n_neurons=0, seed=11))
    values = {"model_class": "ae", "model_type": "conv", "ae_first_channels": 8, "ae_kernel_size": 5,
              "n_ae_latents": 8, "learning_rate": Range(1e-4, 1e-2, log=True), "l2_reg": Range(1e-6, 1e-2, log=True),
              "max_n_epochs": epochs, "min_n_epochs": epochs // 2, "early_stop_history": 5, "batch_size": 40,
              "precision": "fp32", "device": "cpu", "export_train_plots": False, "export_latents": False}
    budget = population * epochs
    store = resolve_store(root / "pbt-store")
    found: dict[str, list[tuple[float, float, float]]] = {"pbt": [], "tpe+hyperband": []}
    for seed in range(seeds):
        for method in found:
            experiment = f"{method}-{seed}"
            started = time.perf_counter()
            options = ({"scheduler": "pbt", "population": population, "perturbation_interval": interval}
                       if method == "pbt" else {"budget_steps": budget, "pruner": "hyperband"})
            outcome = tune("ae", data, experiment, ProjectConfig(experiment, dict(values)), seed=seed, store=store,
                           echo=_quiet, **options)[0]
            best = [r for r in _trial_runs(store, experiment, "ae") if r.info.run_id == outcome.best_run_id][0]
            found[method].append((best.data.metrics["best_val_loss"], best.data.metrics["test_loss"],
                                  time.perf_counter() - started))
            print(f"  {method} seed {seed}: best val {found[method][-1][0]:.5g}, test {found[method][-1][1]:.5g}, "
                  f"{outcome.steps_spent} epochs, {found[method][-1][2]:.0f} s", flush=True)
    lines = [f"## PBT against TPE + Hyperband at {budget} epochs ({population} members x {epochs} epochs, "
             f"exploit every {interval}; {seeds} seeds; medians [quartiles])", "",
             "| method | best val MSE | its test MSE | seconds |", "| --- | --- | --- | --- |"]
    for method, rows in found.items():
        lines.append(f"| {method} | " + " | ".join(quartiles([r[i] for r in rows]) for i in range(3)) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", nargs="+", choices=("ae", "decoder", "pipeline", "pbt"), default=["ae", "decoder"],
                        help="pipeline: the pipeline study against stage-wise selection; pbt: PBT against TPE")
    parser.add_argument("--trials", type=int, default=8, help="trials per pipeline study [8]")
    parser.add_argument("--population", type=int, default=4, help="members of the pbt problem's population [4]")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=None, help="epochs per fit [20; 40 with --size large]")
    parser.add_argument("--size", choices=("small", "large"), default="small")
    parser.add_argument("--methods", nargs="+", choices=METHODS + OPTIONAL_METHODS, default=list(METHODS))
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--warm-start", default="tpe+median", metavar="METHOD",
                        help="the method whose warm start the AE problem measures (one of --methods; 'none' skips)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    machine = describe()
    print(machine, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    makers = {"ae": ae_problem, "decoder": decoder_problem}
    problems, grids, traces, lines = [], {}, {}, []
    with tempfile.TemporaryDirectory() as tmp:
        if "pipeline" in args.problems:
            lines += pipeline_vs_stagewise(Path(tmp), args.seeds, args.trials, args.epochs or 15) + [""]
        if "pbt" in args.problems:
            epochs = args.epochs or 20
            lines += pbt_vs_tpe(Path(tmp), args.seeds, args.population, epochs, max(epochs // 5, 1)) + [""]
        for name in (p for p in args.problems if p in makers):
            problem = makers[name](Path(tmp), args.size, args.epochs)
            started = time.perf_counter()
            grid_fits = []
            for i, point in enumerate(problem.grid):
                grid_fits.append(problem.fit(point))
                if (i + 1) % 12 == 0:
                    print(f"{name} grid {i + 1}/{len(problem.grid)} ({time.perf_counter() - started:.0f} s)", flush=True)
            grid_seconds = time.perf_counter() - started
            grid_epochs = sum(f.epochs for f in grid_fits)
            print(f"{name} grid: {len(grid_fits)} points, {grid_epochs} epochs in {grid_seconds:.0f} s", flush=True)
            traces[name], studies = {}, {}
            for method in args.methods:
                started = time.perf_counter()
                if method == "grid":
                    traces[name][method] = [grid_in_random_order(problem, grid_fits, seed) for seed in range(args.seeds)]
                else:
                    runs = [search(problem, method, seed, grid_epochs // 2) for seed in range(args.seeds)]
                    traces[name][method], studies[method] = [r[0] for r in runs], [r[1] for r in runs]
                print(f"  {method}: {args.seeds} seeds in {time.perf_counter() - started:.0f} s", flush=True)
            problems.append(problem)
            grids[name] = grid_fits
            lines += report(problem, grid_fits, traces[name], grid_seconds) + [""]
            if name == "ae" and args.warm_start in studies:
                started = time.perf_counter()
                lines += warm_start_gain(Path(tmp), args, args.warm_start, studies[args.warm_start], grid_epochs)
                lines += [f"({time.perf_counter() - started:.0f} s)", ""]
    print("\n" + "\n".join(lines))
    (args.out / "search_efficiency.json").write_text(json.dumps(
        {problem: {method: [vars(t) for t in runs] for method, runs in by_method.items()}
         for problem, by_method in traces.items()}))
    (args.out / "search_efficiency.md").write_text(machine + "\n\n" + "\n".join(lines))
    if problems:
        figure = args.out / "search_efficiency.png"
        plot(problems, grids, traces, figure)
        print(f"convergence plot: {figure}")


if __name__ == "__main__":
    main()
