"""`bnet tune decoder`: Optuna studies of neural decoders (and encoders).

Behaviour targets come from upstream runs resolved by MLflow queries (AE latents, their
motion energy, ARHMM states) or from the session's labels; the decoder run records the
upstream run ids and the data digest so `bnet lineage` can walk back to the data. Every
metric drops the first and last ``n_max_lags`` frames of each trial (the largest window in
the study), so decoders with different lags are scored on the same frames.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnet.config import UPSTREAM_KEYS, Categorical, ProjectConfig, Range, dataclass_from_values
from bnet.data import open_session
from bnet.data.exports import write_export
from bnet.data.session import Session, trial_name
from bnet.data.splits import TrialSplits
from bnet.errors import ConfigError, DataError
from bnet.models import build_model, model_entry
from bnet.models.decoder_metrics import (
    accuracy, categorical_log_likelihood, poisson_log_likelihood, r2_score, score_trials, trim_lags,
)
from bnet.models.decoders import DEFAULT_N_LAGS, DecoderConfig, motion_energy
from bnet.plotting.decoders import plot_predictions
from bnet.tracking import conventions as tags
from bnet.tracking.query import RunSummary
from bnet.tracking.registry import resolve_upstream
from bnet.tracking.store import Store
from bnet.training import ComputeConfig, EpochRecord, OnEpochEnd, TrainingConfig, fit, resolve_device
from bnet.tuning import trivial
from bnet.tuning.common import (
    refuse_other_splits, resolve_data_path, session_splits, split_settings, training_configs, upstream_export,
    upstream_run,
)
from bnet.tuning.family import (
    FamilyOption, LOCATION_KEYS, Family, Objective, PreparedStudy, StudyRequest, TrialResult, register_family,
)
from bnet.tuning.space import Condition
from bnet.tuning.study import StudyOutcome, TrialContext

FAMILY = "decoder"
TARGETS = ("ae", "ae-me", "arhmm", "labels")
ENCODERS = {"ae-neural": "ae", "arhmm-neural": "arhmm", "labels-neural": "labels"}
SUBSAMPLE_METHODS = ("none", "single", "loo")

# What a study of each kind of prediction optimises (maximised); the pruner sees the same
# score per epoch, computed on the val trials.
OBJECTIVES = {
    "continuous": Objective(metric="val_r2", direction="maximize", step_metric="epoch_val_r2"),
    "categorical": Objective(metric="val_ll", direction="maximize", step_metric="epoch_val_ll"),
    "counts": Objective(metric="val_ll", direction="maximize", step_metric="epoch_val_ll"),
}
# the noise models each kind of target may be fitted with (the first is the default)
NOISE_DISTS = {"continuous": ("gaussian", "gaussian-full"), "categorical": ("categorical",),
               "counts": ("poisson", "gaussian")}

# BehaveNet's recommended search when the user's config searches nothing.
DEFAULT_SPACE = {
    "learning_rate": Range(1e-4, 1e-2, log=True),
    "l2_reg": Range(1e-6, 1e-1, log=True),
    "n_lags": Categorical((0, 1, 2, 4, 8)),
    "n_hid_layers": Categorical((0, 1, 2)),
    "n_hid_units": Range(16, 128, log=True),
}
# BehaveNet's 1,000 epochs at its default learning rate take hours on a real recording.
DEFAULT_BUDGET = {"max_n_epochs": 200, "early_stop_history": 10}
# hidden units only exist with hidden layers, a lag window only in an MLP
CONDITIONS = {"n_hid_units": Condition("n_hid_layers", lambda value: int(value) > 0, 0, "n_hid_layers > 0"),
              "n_lags": Condition("model_type", lambda value: value != "lstm", 0, "model_type is an MLP")}


def default_space(values: dict[str, Any]) -> dict[str, Any]:
    """BehaveNet's recommended search, for the model type the config fixes: an LSTM has no
    lag window and at least one layer."""
    if values.get("model_type") == "lstm":
        return {**{k: v for k, v in DEFAULT_SPACE.items() if k != "n_lags"}, "n_hid_layers": Categorical((1, 2))}
    return DEFAULT_SPACE


@dataclass
class DecodingData:
    """Per-trial inputs and targets of one decoding problem, and where they came from."""

    inputs: dict[int, np.ndarray]
    targets: dict[int, np.ndarray]
    splits: TrialSplits
    kind: str  # continuous, categorical, counts
    n_classes: int = 0
    upstream: dict[str, RunSummary] = field(default_factory=dict)
    split_keys: dict[str, Any] = field(default_factory=dict)  # the split settings that drew ``splits``

    @property
    def n_input(self) -> int:
        return next(iter(self.inputs.values())).shape[1]

    @property
    def n_output(self) -> int:
        if self.kind == "categorical":
            return self.n_classes
        return next(iter(self.targets.values())).shape[1]


class TrialArrays(torch.utils.data.Dataset):
    """Whole trials as batches ``{"inputs", "targets"}`` (the lag window needs contiguous frames)."""

    def __init__(self, data: DecodingData, trials):
        self.trials = list(trials)
        self.items = []
        for t in self.trials:
            target = torch.from_numpy(np.ascontiguousarray(data.targets[t]))
            self.items.append({"inputs": torch.from_numpy(np.ascontiguousarray(data.inputs[t], dtype=np.float32)),
                               "targets": target.long() if data.kind == "categorical" else target.float()})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


def behaviour(target: str, session: Session, values: dict[str, Any], refs: dict[str, tuple[str | None, str | None]],
              store: Store):
    """(per-trial behaviour, splits, kind, n_classes, upstream runs) for a target."""
    if target == "labels":
        if "labels" not in session.signals:
            raise DataError(f"{session.path}: no group 'labels' to decode")
        if "labels_masks" in session.signals:
            masks = session.read_all("labels_masks")
            missing = [t for t, mask in zip(session.trials, masks) if not np.all(mask)]
            if missing:
                raise DataError(f"{session.path}: labels_masks marks labels missing in {len(missing)} trial(s) "
                                f"(first {trial_name(missing[0])}); decoders fit every frame's labels, so they "
                                f"need sessions whose labels are all present")
        labels = dict(zip(session.trials, (x.astype(np.float32) for x in session.read_all("labels"))))
        return labels, session_splits(session, values), "continuous", 0, {}
    family = "arhmm" if target == "arhmm" else "ae"
    reference, experiment = refs.get(family, (None, None))
    run = upstream_run(family, reference, experiment, session, store)
    upstream = {family: run}
    name, group = ("states", "states") if family == "arhmm" else ("latents", "latents")
    exported = upstream_export(run, name, group, session, store)
    if exported is None:
        raise DataError(f"{run.family} run {run.run_id} has no exports/{name}.hdf5 to decode")
    series, splits = exported
    if family == "arhmm":
        if run.tags.get(f"{tags.UPSTREAM_TAG_PREFIX}ae_run_id"):
            upstream["ae"] = resolve_upstream(run.tags[f"{tags.UPSTREAM_TAG_PREFIX}ae_run_id"], "ae", store=store)
        return series, splits, "categorical", int(run.params["n_arhmm_states"]), upstream
    if target == "ae-me":
        series = {t: motion_energy(x) for t, x in series.items()}
    return {t: x.astype(np.float32) for t, x in series.items()}, splits, "continuous", 0, upstream


def subsample_settings(values: dict[str, Any]) -> dict[str, str]:
    """BehaveNet's neuron-subset keys with their defaults (part of a fit's identity)."""
    return {"subsample_method": str(values.get("subsample_method", "none")),
            "subsample_idxs_group_0": str(values.get("subsample_idxs_group_0") or ""),
            "subsample_idxs_dataset": str(values.get("subsample_idxs_dataset", "all"))}


def neuron_subsets(session: Session, values: dict[str, Any]) -> dict[str, np.ndarray | None]:
    """``{name: neuron indices}`` to fit, from BehaveNet's subsample options (None: all)."""
    method = values.get("subsample_method", "none")
    if method not in SUBSAMPLE_METHODS:
        raise ConfigError(f"subsample_method must be one of {', '.join(SUBSAMPLE_METHODS)}, got '{method}'")
    if method == "none":
        return {"": None}
    if not session.regions:
        raise DataError(f"{session.path}: subsample_method '{method}' needs a 'regions' group")
    grouping = values.get("subsample_idxs_group_0") or next(iter(session.regions))
    if grouping not in session.regions:
        raise DataError(f"{session.path}: no region grouping regions/{grouping} "
                        f"(has {', '.join(session.regions)})")
    regions = session.regions[grouping]
    wanted = values.get("subsample_idxs_dataset", "all")
    names = list(regions) if wanted == "all" else [wanted]
    for name in names:
        if name not in regions:
            raise DataError(f"{session.path}: no region regions/{grouping}/{name} (has {', '.join(regions)})")
    if method == "single":
        return {name: regions[name] for name in names}
    everyone = np.arange(session.n_neurons)
    return {f"loo-{name}": np.setdiff1d(everyone, regions[name]) for name in names}


def assemble(model_class: str, target: str, session: Session, values, refs, store, neurons) -> DecodingData:
    beh, splits, kind, n_classes, upstream = behaviour(target, session, values, refs, store)
    split_keys = split_settings(next(iter(upstream.values())).params if upstream else values)
    if "neural" not in session.signals:
        raise DataError(f"{session.path}: no group 'neural' (decoders need neural activity)")
    neural = dict(zip(session.trials, session.read_all("neural")))
    if neurons is not None:
        neural = {t: x[:, neurons] for t, x in neural.items()}
    for t in session.trials:
        if len(neural[t]) != len(beh[t]):
            raise DataError(f"{session.path}: {trial_name(t)} has {len(neural[t])} neural frames "
                            f"but {len(beh[t])} {target} frames")
    if kind == "continuous":
        spread = np.concatenate([beh[t] for t in splits.train]).std(axis=0)
        if np.any(spread < 1e-8):
            where = f"{next(iter(upstream.values())).family} run {next(iter(upstream.values())).run_id}" if upstream else str(session.path)
            raise DataError(f"{where}: {target} dimension {int(np.argmin(spread))} is constant over the training "
                            f"trials (an AE stuck at the mean image?): there is nothing to decode")
    if model_class in ENCODERS:
        if kind == "categorical":
            beh = {t: np.eye(n_classes, dtype=np.float32)[z] for t, z in beh.items()}
        counts = all(np.all(x >= 0) and np.all(x == np.round(x)) for x in neural.values())
        return DecodingData(beh, {t: x.astype(np.float32) for t, x in neural.items()}, splits,
                            "counts" if counts else "continuous", 0, upstream, split_keys)
    return DecodingData({t: x.astype(np.float32) for t, x in neural.items()}, beh, splits, kind, n_classes, upstream,
                        split_keys)


def score_predictions(data: DecodingData, predictions: dict[int, np.ndarray], split: str,
                      n_max_lags: int) -> dict[str, float]:
    """``<split>_r2`` (and per dimension) or ``<split>_accuracy`` / ``<split>_ll``."""
    trials = data.splits[split]
    true, predicted = [data.targets[t] for t in trials], [predictions[t] for t in trials]
    if data.kind != "continuous":  # R²'s constant scores 0 by definition
        trivial_answer = constant_prediction(data, n_max_lags)
        constant = [np.broadcast_to(trivial_answer, (len(t), *np.shape(p)[1:])) for t, p in zip(true, predicted)]
    if data.kind == "categorical":
        return {f"{split}_accuracy": score_trials(accuracy, true, predicted, n_max_lags),
                f"{split}_ll": score_trials(categorical_log_likelihood, true, predicted, n_max_lags),
                f"{split}_accuracy_constant": score_trials(accuracy, true, constant, n_max_lags),
                f"{split}_ll_constant": score_trials(categorical_log_likelihood, true, constant, n_max_lags)}
    r2, per_dim = score_trials(r2_score, true, predicted, n_max_lags)
    # per dimension only where it varies: R² of a neuron silent in this split is undefined
    scores = {f"{split}_r2": r2, **{f"{split}_r2_{d}": float(v) for d, v in enumerate(per_dim) if np.isfinite(v)}}
    # the Poisson log-likelihood where the predictions are rates (a Gaussian fit's may not be)
    if data.kind == "counts" and all(np.all(p >= 0) for p in predicted):
        scores[f"{split}_ll"] = score_trials(poisson_log_likelihood, true, predicted, n_max_lags)
        scores[f"{split}_ll_constant"] = score_trials(poisson_log_likelihood, true, constant, n_max_lags)
    return scores


def constant_prediction(data: DecodingData, n_max_lags: int) -> np.ndarray:
    """The trivial answer, from the training trials' scored frames: the state frequencies
    (add-one smoothed, so a state unseen in training is not impossible) or the mean of each
    target dimension (for counts, at least half a count over the training frames, so a
    neuron silent in training has a rate)."""
    train = np.concatenate(trim_lags([data.targets[t] for t in data.splits["train"]], n_max_lags))
    if data.kind == "categorical":
        counts = np.bincount(train.astype(np.int64).ravel(), minlength=data.n_classes)
        return (counts + 1.0) / (counts.sum() + data.n_classes)
    mean = train.reshape(len(train), -1).mean(axis=0)
    return np.maximum(mean, 0.5 / len(train)) if data.kind == "counts" else mean


def neurons_of_run(run: RunSummary, session: Session, params: dict[str, Any] | None = None) -> np.ndarray | None:
    """The neurons of ``session`` a decoder run read (its neuron subset, by the session's
    regions), None for all; ``params`` are the run's own unless given (an ensemble's members')."""
    values = dict(run.params if params is None else params)
    subset = run.tags.get(tags.TAG_NEURON_SUBSET, "all")
    if subset == "all":
        return None
    if values.get("subsample_method", "none") == "none":
        # runs logged before the subset settings were params: the subset's name says its method
        values["subsample_method"] = "loo" if subset.startswith("loo-") else "single"
    subsets = neuron_subsets(session, values)
    if subset not in subsets:
        raise DataError(f"{run.family} run {run.run_id} was fitted to neuron subset '{subset}', which "
                        f"{session.path} does not define (it has {', '.join(s for s in subsets if s) or 'none'})")
    return subsets[subset]


def data_for_run(run: RunSummary, store: Store) -> tuple[Session, DecodingData]:
    """The session and decoding problem a decoder run was fitted to (for ensembles and checks)."""
    session = open_session(run.tags.get(tags.TAG_DATA_PATH, ""), require=("neural",))
    refs = {family: (run.tags.get(f"{tags.UPSTREAM_TAG_PREFIX}{family}_run_id"), None) for family in ("ae", "arhmm")}
    data = assemble(run.params["model_class"], run.tags[tags.TAG_TARGET], session, dict(run.params), refs, store,
                    neurons_of_run(run, session))
    return session, data


def largest_window(values: dict[str, Any]) -> int:
    """``n_max_lags``: the largest ``n_lags`` any trial of the study can use (or the config's own)."""
    if "n_max_lags" in values:
        return int(values["n_max_lags"])
    # without n_lags (an LSTM has none) the frames scored are those of the default window,
    # so LSTM and default MLP studies are scored alike
    lags = values.get("n_lags", DEFAULT_N_LAGS)
    if isinstance(lags, Categorical):
        return int(max(lags.choices))
    if isinstance(lags, Range):
        return int(lags.high)
    return int(lags)


def noise_dist(kind: str, model_type: str, asked: str | None) -> str:
    """The noise model of a decoder: the user's where it suits the target, else the kind's
    default (the full covariance for ``mlp-mv``)."""
    allowed = NOISE_DISTS[kind]
    if asked is None:
        return "gaussian-full" if model_type == "mlp-mv" else allowed[0]
    if asked not in allowed:
        raise ConfigError(f"noise_dist '{asked}' does not suit {kind} targets (use {' or '.join(allowed)})")
    return asked


def decoder_objective(kind: str, values: dict[str, Any]) -> Objective:
    """What a study of ``kind`` targets optimises: counts fitted (in any trial) with Gaussian
    noise are scored by R², as their means may be negative and no Poisson rates."""
    asked = values.get("noise_dist")
    noises = asked.choices if isinstance(asked, Categorical) else (asked,)
    if kind == "counts" and "gaussian" in noises:
        return OBJECTIVES["continuous"]
    return OBJECTIVES[kind]


class DecoderTrials:
    """Fits one decoder per trial (the family's TrialFitter)."""

    def __init__(self, data: DecodingData, session: Session, n_max_lags: int, objective: Objective):
        self.data = data
        self.session = session
        self.n_max_lags = n_max_lags
        self.objective = objective
        self.batches = {name: TrialArrays(data, data.splits[name]) for name in ("train", "val", "test")}

    def configs(self, hparams: dict[str, Any]) -> tuple[DecoderConfig, TrainingConfig, ComputeConfig]:
        model_type = str(hparams.get("model_type", "mlp"))
        model = dataclass_from_values(DecoderConfig, {
            **hparams, "model_type": model_type, "n_input": self.data.n_input, "n_output": self.data.n_output,
            "n_max_lags": self.n_max_lags,
            "noise_dist": noise_dist(self.data.kind, model_type, hparams.get("noise_dist"))})
        model.validate()
        return (model, *training_configs(hparams))

    def check(self, hparams: dict[str, Any]) -> None:
        model_class = str(hparams.get("model_class"))
        if model_entry(model_class).family != FAMILY:
            raise ConfigError(f"model_class '{model_class}' is not a decoder")
        self.configs(hparams)
        shortest = min(len(x) for x in self.data.inputs.values())
        if 2 * self.n_max_lags >= shortest:
            raise DataError(f"{self.session.path}: n_lags={self.n_max_lags} leaves no frames to score in the "
                            f"shortest trial ({shortest} frames; 2 x n_lags are dropped)")

    def metric_names(self, hparams: dict[str, Any]) -> dict[str, str]:
        """The final metrics every trial logs that a study may optimise, with their better direction
        (a counts decoder's log-likelihood is left out: a Gaussian fit's rates may be negative)."""
        scores = {"categorical": ("accuracy", "ll")}.get(self.data.kind, ("r2",))
        return {"best_val_loss": "minimize", "best_epoch": "minimize", "n_epochs": "minimize",
                **{f"{split}_{score}": "maximize" for split in ("val", "test") for score in scores}}

    def resolve(self, hparams: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        model, training, compute = self.configs(hparams)
        params = {**asdict(model), **asdict(training), **asdict(compute), "precision": "fp32",
                  **self.data.split_keys, **subsample_settings(hparams),
                  **{f"n_{k}_trials": len(v) for k, v in self.data.splits.as_dict().items()}}
        return params, {tags.TAG_MODEL_CLASS: model.model_class, tags.TAG_MODEL_TYPE: model.model_type}

    def predict(self, model, trials) -> dict[int, np.ndarray]:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        with torch.no_grad():
            predictions = {t: model.predict(torch.from_numpy(np.ascontiguousarray(self.data.inputs[t], np.float32))
                                            .to(device)).float().cpu().numpy() for t in trials}
        model.train(was_training)
        return predictions

    def score(self, model, split: str) -> float:
        """The study's metric on one split, from the model as it stands."""
        predictions = self.predict(model, self.data.splits[split])
        return score_predictions(self.data, predictions, split, self.n_max_lags)[
            self.objective.metric.replace("val", split, 1)]

    def initial_model(self, model_config: DecoderConfig):
        """A new model ready to train: inputs standardised by the training trials' statistics,
        outputs starting at the trivial answer (:func:`constant_prediction`)."""
        model = build_model(model_config)
        if model_config.standardize_inputs:
            model.set_input_statistics(torch.cat([batch["inputs"] for batch in self.batches["train"]]))
        model.start_at(torch.as_tensor(constant_prediction(self.data, self.n_max_lags)))
        return model

    def fit(self, context: TrialContext) -> TrialResult:
        model_config, training, compute = self.configs(context.hparams)
        device = resolve_device(compute.device)
        model = self.initial_model(model_config)
        max_epochs = training.max_n_epochs

        def report(record: EpochRecord) -> None:
            context.report(record.epoch, {"train_loss": record.train_loss, "val_loss": record.val_loss,
                                          self.objective.step_metric: self.score(model, "val")},
                           max_epochs, shown=record.epoch + 1, state=record.state)

        result = fit(model, self.batches["train"], self.batches["val"], training, weight_decay=model_config.l2_reg,
                     device=device, precision="fp32", callbacks=[OnEpochEnd(report)], resume=context.resume)
        model.cpu()
        predictions = self.predict(model, self.session.trials)
        metrics = {"best_val_loss": result.best_val_loss, "best_epoch": result.best_epoch,
                   "n_epochs": len(result.history)}
        for split in ("val", "test"):
            metrics.update(score_predictions(self.data, predictions, split, self.n_max_lags))
        self.log_artifacts(context, predictions)
        return TrialResult(metrics, model)

    def log_artifacts(self, context, predictions: dict[int, np.ndarray]) -> None:
        """The predictions of every trial (``exports/predictions.hdf5``) and a figure of held-out ones."""
        run = context.run
        with tempfile.TemporaryDirectory() as tmp:
            path = write_export(Path(tmp) / "predictions.hdf5", {"predictions": predictions}, self.data.splits,
                                {"run_id": run.run_id, "kind": self.data.kind})
            run.log_file(path, tags.EXPORTS_DIR)
        shown = list(self.data.splits.test[:3])
        run.log_figure(plot_predictions([self.data.targets[t] for t in shown], [predictions[t] for t in shown],
                                        [f"held-out {trial_name(t)}" for t in shown], self.data.kind), "predictions")


def _model_class(request: StudyRequest) -> str:
    target = request.options["target"]
    return "neural-labels" if target == "labels" else f"neural-{target}"


def prepare(request: StudyRequest, store: Store) -> list[PreparedStudy]:
    target, values = request.options["target"], request.values
    if isinstance(values["model_class"], (Categorical, Range)):
        raise ConfigError("model_class cannot be searched in a decoder study (each class has its own target)")
    model_class = str(values["model_class"])
    wanted_target = ENCODERS.get(model_class) or model_class.removeprefix("neural-")
    if wanted_target != target:
        raise ConfigError(f"model_class '{model_class}' does not fit --target {target}")
    session = open_session(resolve_data_path(values, request.data), require=("neural",))
    n_max_lags = largest_window(values)
    refs = {"ae": request.upstream.get("ae", (None, None)), "arhmm": request.upstream.get("arhmm", (None, None))}
    refs = {family: (ref or values.get(f"{family}_version"), experiment or values.get(f"{family}_experiment_name"))
            for family, (ref, experiment) in refs.items()}
    prepared = []
    for subset, neurons in neuron_subsets(session, values).items():
        decoding = assemble(model_class, target, session, values, refs, store, neurons)
        if decoding.upstream:
            refuse_other_splits(values, next(iter(decoding.upstream.values())))
        run_tags = {tags.TAG_TARGET: target, tags.TAG_TARGET_KIND: decoding.kind,
                    tags.TAG_NEURON_SUBSET: subset or "all",
                    **{f"{tags.UPSTREAM_TAG_PREFIX}{family}_run_id": run.run_id
                       for family, run in decoding.upstream.items()}}
        objective = decoder_objective(decoding.kind, values)
        prepared.append(PreparedStudy(session, DecoderTrials(decoding, session, n_max_lags, objective),
                                      objective, run_tags, subset))
    return prepared


register_family(Family(
    name=FAMILY, default_space=default_space, default_budget=DEFAULT_BUDGET, conditions=CONDITIONS,
    step_name="epoch", budget_key="max_n_epochs", prepare=prepare, default_model_class=_model_class,
    machinery=LOCATION_KEYS | UPSTREAM_KEYS | {"export_predictions", "export_train_plots"},
    trivial=trivial.against_constant,
    summary="Tune neural decoders of AE latents, their motion energy, ARHMM states or labels.",
    upstream=("ae", "arhmm"),
    options=(FamilyOption("target", "Behaviour to decode (or, with model_class ae-neural/arhmm-neural, to encode "
                                    "from).", choices=TARGETS, required=True),),
    behavenet_configs=("data", "model", "training"),
    shown_params=("model_type", "learning_rate", "l2_reg", "n_lags", "n_hid_layers", "n_hid_units"),
    population_based=True,
))


def tune_decoder(data: str | Path | None = None, target: str = "ae", experiment: str | None = None,
                 config: ProjectConfig | None = None, max_epochs: int | None = None,
                 **options) -> list[StudyOutcome]:
    """Run (or resume) decoder studies (one per neuron subset); the Python face of
    ``bnet tune decoder``. ``ae``/``ae_experiment`` and ``arhmm``/``arhmm_experiment`` name
    the upstream runs; the other ``options`` are those of :func:`bnet.tuning.tune.tune`."""
    from bnet.tuning.tune import tune

    return tune(FAMILY, data, experiment, config, target=target, max_steps=max_epochs, **options)
