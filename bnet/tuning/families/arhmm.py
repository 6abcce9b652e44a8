"""`bnet tune arhmm`: an Optuna study of ARHMMs over AE latents (or labels).

The input is resolved by an MLflow query (``--ae best|RUN_ID|models:/NAME@ALIAS``): latents
come from the AE run's exported artifact, or are computed by loading its model. The
objective is the held-out log-likelihood per time step and dimension on the val split
(BehaveNet's number), and the parameters that earn it are the ones saved.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnet.config import Categorical, ProjectConfig, Range, dataclass_from_values
from bnet.data import open_session, split_trials
from bnet.data.exports import write_export
from bnet.data.session import Session, trial_name
from bnet.data.splits import TrialSplits
from bnet.errors import ConfigError, DataError
from bnet.models import build_model, model_entry
from bnet.models.arhmm.registered import HMM_CLASSES, LABEL_CLASSES, SegmentationConfig
from bnet.models.arhmm.ssm_engine import fit_with_ssm, import_ssm, ssm_model_arguments
from bnet.plotting.arhmm import plot_durations, plot_dynamics, plot_state_raster, plot_transition_matrix, run_lengths
from bnet.tracking import conventions as tags
from bnet.tracking.query import RunSummary
from bnet.tracking.registry import load_model
from bnet.tracking.store import Store
from bnet.training import resolve_device
from bnet.tuning import trivial
from bnet.tuning.common import resolve_data_path, session_splits, split_settings, upstream_export, upstream_run
from bnet.tuning.family import (
    FamilyOption, LOCATION_KEYS, Family, Objective, PreparedStudy, StudyRequest, TrialResult, register_family,
)
from bnet.tuning.space import Condition
from bnet.tuning.study import StudyOutcome, TrialContext

FAMILY = "arhmm"
OBJECTIVE = Objective(metric="val_ll_per_step", direction="maximize", step_metric="val_ll")

# BehaveNet's recommended search when the user's config searches nothing.
DEFAULT_SPACE = {
    "n_arhmm_states": Range(2, 16),
    "n_arhmm_lags": Categorical((1, 2)),
    "transitions": Categorical(("stationary", "sticky")),
    "kappa": Range(1e2, 1e8, log=True),
}
DEFAULT_BUDGET = {"n_iters": 100, "arhmm_es_tol": 1e-6}
# kappa only acts on sticky transitions, lags only on AR dynamics: elsewhere they are 0 and
# not dimensions of the trial
CONDITIONS = {"kappa": Condition("transitions", lambda value: value == "sticky", 0.0, "transitions is sticky"),
              "n_arhmm_lags": Condition("model_class", lambda value: value not in HMM_CLASSES, 0,
                                        "model_class has AR dynamics")}


@dataclass
class SegmentationFitConfig:
    """How to fit an ARHMM (BehaveNet's ``arhmm_training.json`` keys).

    Attributes:
        n_iters: EM iterations at most.
        arhmm_es_tol: stop when the relative change of the training log-likelihood is at
            most this (0: run every iteration).
        export_states: write Viterbi states and posteriors per trial as an artifact.
        export_train_plots: write the figures (rasters, durations, transitions, dynamics).
        device: ``cpu`` (float64), ``cuda`` (float32) or ``auto``.
        engine: ``bnet`` (the PyTorch engine) or ``ssm`` (the ssm library, where it is
            importable; no per-iteration metrics or pruning, as ssm's EM has no callback).
    """

    n_iters: int = 150
    arhmm_es_tol: float = 0.0
    export_states: bool = True
    export_train_plots: bool = True
    device: str = "cpu"
    engine: str = "bnet"


@dataclass
class Observations:
    """What the ARHMM is fitted to, per trial, and where it came from."""

    values: dict[int, np.ndarray]
    splits: TrialSplits
    name: str  # "latent" or "label"
    split_keys: dict[str, Any] = field(default_factory=dict)  # the split settings that drew ``splits``
    upstream: RunSummary | None = None

    @property
    def n_dims(self) -> int:
        return next(iter(self.values.values())).shape[1]

    def split(self, name: str) -> list[np.ndarray]:
        return [self.values[t] for t in self.splits[name]]


def ae_observations(session: Session, ae_run: RunSummary, store: Store) -> Observations:
    """The AE run's exported latents, or latents computed by loading its model."""
    exported = upstream_export(ae_run, "latents", "latents", session, store)
    if exported is not None:
        latents, splits = exported
    else:
        from bnet.models.serving import encode_session

        model = load_model(ae_run.run_id, store)
        latents = encode_session(model, session, torch.device("cpu"))
        splits = split_trials(session.trials, **split_settings(ae_run.params), source=str(session.path))
    return Observations(latents, splits, "latent", split_settings(ae_run.params), ae_run)


def label_observations(session: Session, values: dict[str, Any]) -> Observations:
    labels = dict(zip(session.trials, session.read_all("labels")))
    return Observations({t: x.astype(np.float64) for t, x in labels.items()}, session_splits(session, values), "label",
                        split_settings(values))


def check_observations(observations: Observations, source: str) -> None:
    for trial, x in observations.values.items():
        if not np.all(np.isfinite(x)):
            bad = int(np.argwhere(~np.isfinite(x))[0][0])
            raise DataError(f"{source}: {trial_name(trial)} has NaN or infinite {observations.name}s (frame {bad})")


class ARHMMTrials:
    """Fits one ARHMM per trial on fixed observations (the family's TrialFitter)."""

    def __init__(self, observations: Observations, session: Session, source: str):
        self.observations = observations
        self.session = session
        self.source = source

    def configs(self, hparams: dict[str, Any]) -> tuple[SegmentationConfig, SegmentationFitConfig]:
        values = dict(hparams)
        if values.get("model_class") in HMM_CLASSES:
            values.setdefault("n_arhmm_lags", 0)
        fit = dataclass_from_values(SegmentationFitConfig, values)
        model = dataclass_from_values(SegmentationConfig, {
            **values, "n_iters": int(fit.n_iters), "arhmm_es_tol": fit.arhmm_es_tol,
            "device": str(resolve_device(fit.device))})
        return model, fit

    def check(self, hparams: dict[str, Any]) -> None:
        segmentation_class(hparams.get("model_class", "arhmm"))
        model, fit = self.configs(hparams)
        if fit.engine not in ("bnet", "ssm"):
            raise ConfigError(f"engine must be bnet or ssm, got '{fit.engine}'")
        if fit.engine == "ssm":
            import_ssm()
            ssm_model_arguments(model)
        shortest = min(len(x) for x in self.observations.values.values())
        if model.n_arhmm_lags >= shortest:
            raise DataError(f"{self.source}: n_arhmm_lags={model.n_arhmm_lags} is not less than the "
                            f"shortest trial ({shortest} frames)")
        n_train = sum(len(x) - model.n_arhmm_lags for x in self.observations.split("train"))
        if model.n_arhmm_states > n_train:
            raise DataError(f"{self.source}: n_arhmm_states={model.n_arhmm_states} is more than the "
                            f"{n_train} training frames")

    def metric_names(self, hparams: dict[str, Any]) -> dict[str, str]:
        """The final metrics every trial logs that a study may optimise, with their better direction."""
        return {**{f"{split}_ll_per_step": "maximize" for split in ("train", "val", "test")},
                **{f"{split}_ll_gain_per_step": "maximize" for split in ("val", "test")},
                "best_iteration": "minimize", "n_iters_run": "minimize"}

    def resolve(self, hparams: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        config, fit_config = self.configs(hparams)
        obs = self.observations
        params = {**asdict(config), **asdict(fit_config), "n_dims": obs.n_dims, **obs.split_keys,
                  **{f"n_{k}_trials": len(v) for k, v in obs.splits.as_dict().items()}}
        return params, {tags.TAG_MODEL_CLASS: config.model_class, tags.TAG_MODEL_TYPE: config.noise_type}

    def fit(self, context: TrialContext) -> TrialResult:
        config, fit_config = self.configs(context.hparams)
        obs = self.observations
        model = build_model(config)
        engine = model.engine
        train, val, test = (obs.split(name) for name in ("train", "val", "test"))
        scale = {name: sum(len(x) for x in xs) * obs.n_dims for name, xs in
                 (("train", train), ("val", val), ("test", test))}
        engine.initialize(train)
        best = {"value": engine.log_likelihood(val) / scale["val"], "iteration": 0,
                "state": engine.state_dict()}

        def on_iteration(iteration: int, train_ll: float, val_ll: float | None) -> bool:
            # per-iteration series get their own names: MLflow's "latest" value of a metric is
            # the one with the highest step, so the final val_ll_per_step must not share a key
            per_step = {"train_ll": train_ll / scale["train"], "val_ll": val_ll / scale["val"]}
            if per_step["val_ll"] > best["value"]:
                best.update(value=per_step["val_ll"], iteration=iteration, state=engine.state_dict())
            context.report(iteration, per_step, config.n_iters)
            return False

        if fit_config.engine == "ssm":
            fitted = fit_with_ssm(config, train, config.n_iters)
            best.update(value=fitted.log_likelihood(val) / scale["val"], iteration=config.n_iters,
                        state=fitted.state_dict())
            n_iters_run = config.n_iters
        else:
            n_iters_run = engine.fit(train, callback=on_iteration, val_sequences=val).n_iters
        model.load_state_dict(best["state"])
        engine = model.engine
        engine.permute_states_by_usage(train)
        val_score = engine.log_likelihood(val) / scale["val"]
        if not math.isclose(val_score, best["value"], rel_tol=1e-6, abs_tol=1e-9):
            raise RuntimeError(f"saved parameters score {val_score}, selected {best['value']}")

        trials = list(self.session.trials)
        sequences = [obs.values[t] for t in trials]
        states = [z.cpu().numpy().astype(np.int64) for z in engine.viterbi(sequences)]
        probs = [p.cpu().numpy() for p in engine.expected_states(sequences).expected_states]
        durations = run_lengths(states, config.n_arhmm_states)
        usage = np.bincount(np.concatenate(states), minlength=config.n_arhmm_states) / sum(len(z) for z in states)
        all_durations = [d for per_state in durations for d in per_state]
        metrics = {
            OBJECTIVE.metric: val_score,
            "train_ll_per_step": engine.log_likelihood(train) / scale["train"],
            "test_ll_per_step": engine.log_likelihood(test) / scale["test"],
            "best_iteration": best["iteration"],
            "n_iters_run": n_iters_run,
            "median_state_duration": float(np.median(all_durations)),
            "n_states_used": int((usage > 0).sum()),
            **{f"state_usage_{k}": float(u) for k, u in enumerate(usage)},
        }
        one = one_state_model(config, train)
        for split, sequences in (("val", val), ("test", test)):
            metrics[f"{split}_ll_per_step_one_state"] = one.log_likelihood(sequences) / scale[split]
            metrics[f"{split}_ll_gain_per_step"] = (metrics[f"{split}_ll_per_step"]
                                                    - metrics[f"{split}_ll_per_step_one_state"])
        self._log_artifacts(context, model, config, fit_config, trials, states, probs, durations)
        return TrialResult(metrics, model, {"observations": obs.name})

    def _log_artifacts(self, context, model, config, fit_config, trials, states, probs, durations) -> None:
        run, obs = context.run, self.observations
        if fit_config.export_states:
            with tempfile.TemporaryDirectory() as tmp:
                path = write_export(Path(tmp) / "states.hdf5",
                                    {"states": dict(zip(trials, states)), "probs": dict(zip(trials, probs))},
                                    obs.splits, {"run_id": run.run_id, "dataset": self.session.dataset_id})
                run.log_file(path, tags.EXPORTS_DIR)
        if fit_config.export_train_plots:
            shown = list(obs.splits.test[:2]) + list(obs.splits.val[:2])
            index = {t: i for i, t in enumerate(trials)}
            run.log_figure(plot_state_raster([obs.values[t] for t in shown], [states[index[t]] for t in shown],
                                             [f"held-out {trial_name(t)}" for t in shown], config.n_arhmm_states,
                                             obs.name), "state_raster")
            run.log_figure(plot_durations(durations), "state_durations")
            params = model.engine.parameters
            if params.log_Ps is not None:
                matrix = torch.softmax(params.log_Ps, dim=-1).cpu().numpy()
                run.log_figure(plot_transition_matrix(matrix), "transition_matrix")
            if config.n_arhmm_lags > 0:
                run.log_figure(plot_dynamics(params.As.cpu().numpy()), "ar_dynamics")


def one_state_model(config: SegmentationConfig, train: list[np.ndarray]):
    """The trivial answer for a segmentation: one state with the same lags and noise model (a
    single AR model, or one Gaussian for an HMM), fitted to the same training trials. With one
    state every posterior is 1, so EM's first M-step is the fit (Student-t noise iterates)."""
    one = build_model(replace(config, n_arhmm_states=1, transitions="stationary", kappa=0.0, n_iters=20,
                              arhmm_es_tol=1e-9))
    one.engine.fit(train)
    return one.engine


def segmentation_class(model_class: Any) -> str:
    """``model_class`` where it names a segmentation model; a ConfigError otherwise."""
    if model_entry(str(model_class)).family != FAMILY:
        raise ConfigError(f"model_class '{model_class}' is not a segmentation model "
                          f"(hmm, arhmm, {', '.join(LABEL_CLASSES)})")
    return str(model_class)


def fits_labels(request: StudyRequest) -> bool:
    """Whether a study segments labels: ``--labels``, or a ``-labels`` class in the config
    (BehaveNet said it with the model class alone)."""
    model_class = request.values["model_class"]
    classes = [segmentation_class(c) for c in (model_class.choices if isinstance(model_class, Categorical)
                                               else (model_class,))]
    kinds = {c in LABEL_CLASSES for c in classes}
    if len(kinds) > 1:
        raise ConfigError(f"model_class searches {', '.join(classes)}: a study segments either labels "
                          f"({', '.join(LABEL_CLASSES)}) or AE latents, not both")
    labels = kinds.pop()
    if request.options.get("labels") and not labels:
        raise ConfigError(f"--labels segments labels, but model_class '{classes[0]}' fits AE latents "
                          f"(use {' or '.join(LABEL_CLASSES)})")
    return labels


def prepare(request: StudyRequest, store: Store) -> list[PreparedStudy]:
    values = request.values
    reference, experiment = request.upstream.get("ae", (None, None))
    reference = reference or values.get("ae_version")
    labels = fits_labels(request)
    if labels and reference:
        raise ConfigError("labels and AE latents are alternatives (--labels or a -labels model_class, or --ae): "
                          "segment one, not both")
    session = open_session(resolve_data_path(values, request.data), require=("labels",) if labels else ())
    if labels:
        observations = label_observations(session, values)
        run_tags = {}
        source = f"{session.path} (labels)"
    else:
        ae_run = upstream_run("ae", str(reference or "best"), experiment or values.get("ae_experiment_name"),
                              session, store)
        observations = ae_observations(session, ae_run, store)
        run_tags = {f"{tags.UPSTREAM_TAG_PREFIX}ae_run_id": ae_run.run_id}
        source = f"{session.path} (latents of AE run {ae_run.run_id})"
    check_observations(observations, source)
    return [PreparedStudy(session, ARHMMTrials(observations, session, source), OBJECTIVE, run_tags)]


register_family(Family(
    name=FAMILY, default_space=DEFAULT_SPACE, default_budget=DEFAULT_BUDGET, conditions=CONDITIONS,
    step_name="EM iteration", budget_key="n_iters", prepare=prepare,
    default_model_class=lambda request: "arhmm-labels" if request.options.get("labels") else "arhmm",
    machinery=LOCATION_KEYS | {"export_states", "export_train_plots", "ae_experiment_name", "ae_version"},
    trivial=trivial.against_one_state,
    summary="Tune ARHMMs over an AE's latents (resolved by an MLflow query) or over labels.",
    upstream=("ae",),
    options=(FamilyOption("labels", "Segment the session's labels instead (arhmm-labels; a config's model_class "
                                    "hmm-labels or arhmm-labels says the same).", flag=True),
             FamilyOption("engine", "Fit with bnet's engine or with ssm where it is importable [default bnet].",
                          choices=("bnet", "ssm"), config_key=True)),
    budget_flag="iters", default_device="cpu, float64",
    shown_params=("n_arhmm_states", "n_arhmm_lags", "noise_type", "transitions", "kappa"),
))


def tune_arhmm(data: str | Path | None = None, experiment: str | None = None,
               config: ProjectConfig | None = None, max_iters: int | None = None, **options) -> StudyOutcome:
    """Run (or resume) an ARHMM study; the Python face of ``bnet tune arhmm``.

    ``ae`` (``best``: the best AE fitted to this file; a run id; ``models:/NAME@ALIAS``) and
    ``ae_experiment`` name the AE whose latents to segment, or ``labels=True`` segments the
    session's labels; ``max_iters`` is ``n_iters`` of every trial; the other ``options`` are
    those of :func:`bnet.tuning.tune.tune`.
    """
    from bnet.tuning.tune import tune

    return tune(FAMILY, data, experiment, config, max_steps=max_iters, **options)[0]
