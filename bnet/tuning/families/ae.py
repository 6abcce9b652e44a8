"""The autoencoder family: studies of every AE class on one session or several
(``bnet tune ae``).

Every class of the family (``ae``, ``vae``, ``beta-tcvae``, ``cond-ae``, ``cond-vae``,
``cond-ae-msp``, ``ps-vae``, ``msps-vae``, ``labels-images``) is fitted by the same trials:
its named loss terms are logged per epoch (``val_<term>``) and at the best epoch
(``best_val_<term>``, ``test_<term>``), label-reading classes add label R², PS-VAEs the
mean absolute correlation of their unsupervised latents and MSPS-VAEs the accuracy of a
classifier telling sessions apart from them. Any of these final metrics can be a study's
objective (``tuning.metric``), or several at once (a multi-objective study).

Everything about the inputs is checked before the first run is created (data files, config
keys, model class, search ranges, splits), so bad input leaves nothing in the store.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from bnet.config import Categorical, ProjectConfig, Range, dataclass_from_values, named_values, typed_value
from bnet.data import TrialBatches, open_session
from bnet.data.datasets import SessionBatches
from bnet.data.exports import write_export
from bnet.data.session import Session
from bnet.data.sessions import SessionGroup, export_name, members, select_sessions, wants_several
from bnet.errors import ConfigError, DataError
from bnet.models import build_model, model_entry
from bnet.models.ae import AEConfig
from bnet.models.ae_arch import architecture_from_json, architecture_values, estimate_memory_gb
from bnet.models.ae_losses import label_mask, mean_abs_correlation, r2_score
from bnet.models.frame_metrics import MeanFrame
from bnet.models.serving import encode_session
from bnet.plotting import plot_reconstructions, plot_training_curves
from bnet.tracking import conventions as tags
from bnet.tracking.query import fitted_datasets
from bnet.tracking.store import Store
from bnet.training import (
    Augmentation, ComputeConfig, EpochRecord, OnEpochEnd, TrainingConfig, evaluate_terms, fit, resolve_device, resolve_precision,
)
from bnet.tuning import trivial
from bnet.tuning.common import resolve_data_path, session_splits, split_settings, training_configs
from bnet.tuning.family import (
    LOCATION_KEYS, Family, Objective, PreparedStudy, StudyRequest, TrialResult, register_family,
)
from bnet.tuning.study import StudyOutcome, TrialContext

FAMILY = "ae"
OBJECTIVE = Objective(metric="best_val_loss", direction="minimize", step_metric="val_loss")

# The search when the user's config searches nothing: BehaveNet's (4-16 latents, learning
# rate 1e-5 to 1e-3) moved to where real video is fitted well. On the tracked open-field mouse
# (64 px, 60 epochs) learning rates of 1e-4 to 2e-4 gave the best held-out fits (frame variance
# explained 0.53-0.55 val), 1.4e-3 and above stayed near the mean frame (0.08), and below 3e-5
# fits were the slowest (cut by the pruner at epoch 12 at 0.2-0.3); 32 latents were needed for
# 0.5 on the test trials there and on the mirror mouse (16 latents: 0.45-0.48).
DEFAULT_SPACE = {
    "n_ae_latents": Categorical((8, 16, 32)),
    "learning_rate": Range(5e-5, 1e-3, log=True),
}
# Epoch budget where the user sets none (BehaveNet's 1,000 epochs is hours on a CPU). Real
# video needs more than synthetic: on the tracked open-field mouse (749 frames, 64 px) the two
# trials that finished a 30-epoch budget were still improving at its end (held-out variance
# explained 0.47); the pruner (a fifth of the budget's warm-up) cuts the laggards.
DEFAULT_BUDGET = {"max_n_epochs": 60, "min_n_epochs": 15, "early_stop_history": 10}

# How far whole training frames move where the user says nothing: up to 3 px, and not at all
# in windows that follow an animal or for classes that read labels. Measured one fit each (32
# latents, 60-70 epochs, held-out frame variance explained val / test): the head-fixed mirror
# mouse 0.51 / 0.54 unmoved, 0.52 / 0.56 shifted (paws drawn alike), 0.47 / 0.50 also turned by
# up to 15 degrees; the tracked open-field mouse 0.53 / 0.49 unmoved, 0.73 / 0.63 shifted, 0.75 /
# 0.72 also turned, but the moved fits drew the arena wall sharper and the mouse as a blur with
# little of its tail (the wall is most of the window's pixel variance): there the user chooses.
DEFAULT_SHIFT = 3.0

# final metrics every class has, beyond its loss terms' best_val_/test_ values
COMMON_METRICS = {"best_val_loss": "minimize", "test_loss": "minimize", "best_epoch": "minimize",
                  "n_epochs": "minimize", "train_frames_per_s": "maximize", "fit_seconds": "minimize",
                  **{f"{split}_{name}": "maximize" for split in ("train", "val", "test")
                     for name in ("var_explained", "moving_var_explained")}}
LABEL_METRICS = {"val_label_r2": "maximize", "test_label_r2": "maximize"}
PS_METRICS = {"val_unsup_corr": "minimize", "test_unsup_corr": "minimize"}
SESSION_METRICS = {"val_session_accuracy": "minimize", "test_session_accuracy": "minimize"}


def check_image_shape(data: Session | SessionGroup, values: dict[str, Any]) -> None:
    for key, actual in zip(("n_input_channels", "y_pixels", "x_pixels"), data.image_shape):
        wanted = values.get(key)
        if wanted is not None and not isinstance(wanted, (Categorical, Range)) and int(wanted) != actual:
            raise DataError(f"{data.path}: images are {data.image_shape} (C, Y, X) but the config sets {key}={wanted}")


def _model_classes(values: dict[str, Any]) -> list[str]:
    chosen = values.get("model_class", "ae")
    return list(chosen.choices) if isinstance(chosen, Categorical) else [str(chosen)]


def _uses_labels(model_class: str) -> bool:
    return model_entry(model_class).builder.uses_labels


class AETrials:
    """Fits one model of the AE family per trial on one session or a group (the family's
    TrialFitter)."""

    def __init__(self, data: Session | SessionGroup):
        self.data = data
        self.sessions = members(data)
        self._batches: dict[tuple, dict[str, SessionBatches]] = {}

    def configs(self, hparams: dict[str, Any]) -> tuple[AEConfig, TrainingConfig, ComputeConfig]:
        C, Y, X = self.data.image_shape
        model_class = str(hparams.get("model_class", "ae"))
        filled = {"n_input_channels": C, "y_pixels": Y, "x_pixels": X, "n_sessions": len(self.sessions),
                  "n_labels": (self.data.n_labels or 0) if _uses_labels(model_class) else 0,
                  **architecture_values(hparams, (Y, X))}
        model = dataclass_from_values(model_entry(model_class).config_type, {**hparams, **filled})
        model.validate()
        if model.fit_sess_io_layers and len(self.sessions) < 2:
            raise ConfigError("fit_sess_io_layers needs several sessions (sessions_csv or 'all')")
        return (model, *training_configs(hparams))

    @property
    def has_masks(self) -> bool:
        return all("masks" in s.signals for s in self.sessions)

    def augmentation(self, model: AEConfig, hparams: dict[str, Any]) -> Augmentation:
        """How the trial's training frames move: ``augment_shift`` (pixels) and
        ``augment_rotation`` (degrees) as set, else whole frames by up to :data:`DEFAULT_SHIFT`
        pixels and windows that follow an animal (:attr:`Session.follows_animal`) not at all;
        never for a class that reads labels (they do not move with the frames)."""
        reads_labels = _uses_labels(model.model_class)
        following = any(s.follows_animal for s in self.sessions)
        defaults = {"augment_shift": 0.0 if following else DEFAULT_SHIFT, "augment_rotation": 0.0}
        moves = {}
        for key, default in defaults.items():
            value = typed_value(key, hparams.get(key), float | None)
            if value and reads_labels:
                raise ConfigError(f"{key} {value:g} would move the frames but not the labels model_class "
                                  f"'{model.model_class}' reads: leave it out (classes that read labels are "
                                  f"never moved) or set it to 0")
            moves[key] = (0.0 if reads_labels else default) if value is None else value
        return Augmentation(moves["augment_shift"], moves["augment_rotation"], seed=int(hparams.get("rng_seed_train", 0)))

    def signals(self, model: AEConfig, hparams: dict[str, Any]) -> tuple[str, ...]:
        signals = ["images"]
        if hparams.get("use_output_mask"):
            signals.append("masks")
        if model.n_labels:
            signals.append("labels")
            if hparams.get("use_label_mask"):
                signals.append("labels_masks")
        return tuple(signals)

    def batches(self, hparams: dict[str, Any], model: AEConfig, chunk: int | None):
        splits = [session_splits(s, hparams) for s in self.sessions]
        signals = self.signals(model, hparams)
        train_mix = model_entry(model.model_class).builder.sessions_per_batch(model)
        key = (tuple(splits), chunk, signals, train_mix)
        if key not in self._batches:
            built = {}
            for name in ("train", "val", "test"):
                per_session = [TrialBatches(s, split[name], signals, chunk) for s, split in zip(self.sessions, splits)]
                mix = train_mix if name == "train" else 1
                built[name] = SessionBatches(per_session, mix)
            # kept: the same splits read with other signals (a masked session's scoring batches
            # beside its training ones), so trials do not read the session twice each
            self._batches = {k: v for k, v in self._batches.items() if k[:2] == key[:2]}
            self._batches[key] = built
        return splits, self._batches[key]

    def metric_names(self, hparams: dict[str, Any]) -> dict[str, str]:
        """The final metrics a trial with these hyperparameters logs, with their better direction."""
        model = build_model(self.configs(hparams)[0])
        batch = {"images": torch.zeros((2, *self.data.image_shape)), "session": torch.zeros(2, dtype=torch.long)}
        if model.config.n_labels:
            batch["labels"] = torch.zeros((2, model.config.n_labels))
        terms = [t for t in model.eval().loss_terms(batch) if t != "loss"]
        names = dict(COMMON_METRICS)
        if self.has_masks:
            names.update({f"{split}_masked_var_explained": "maximize" for split in ("train", "val", "test")})
        for term in terms:
            names[f"best_val_{term}"] = names[f"test_{term}"] = "minimize"
        if model.config.model_class == "msps-vae":
            names["train_triplet_at_best"] = "minimize"
        if hasattr(model, "predict_labels"):
            names.update(LABEL_METRICS)
        if "unsupervised" in model.latent_groups():
            names.update(PS_METRICS)
            if len(self.sessions) > 1:
                names.update(SESSION_METRICS)
        return names

    def check(self, hparams: dict[str, Any]) -> None:
        model_class = str(hparams.get("model_class", "ae"))
        if model_entry(model_class).family != FAMILY:
            raise ConfigError(f"model_class '{model_class}' is not an autoencoder")
        model, _, _ = self.configs(hparams)
        build_model(model)  # class-specific checks (latent counts, sessions per batch)
        self.augmentation(model, hparams)
        for session in self.sessions:
            session_splits(session, hparams)
            if hparams.get("use_output_mask") and "masks" not in session.signals:
                raise DataError(f"{session.path}: use_output_mask is set but there is no group 'masks'")
            if model.n_labels and hparams.get("use_label_mask") and "labels_masks" not in session.signals:
                raise DataError(f"{session.path}: use_label_mask is set but there is no group 'labels_masks'")

    def resolve(self, hparams: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        model, training, compute = self.configs(hparams)
        splits = session_splits(self.sessions[0], hparams)
        params = {**named_values(model), **named_values(training), **named_values(compute), **split_settings(hparams),
                  # the precision the fit runs in, not "auto": bf16 and float32 fits are not the same fit
                  "precision": resolve_precision(compute.precision, resolve_device(compute.device)),
                  "use_output_mask": bool(hparams.get("use_output_mask", False)),
                  "use_label_mask": bool(hparams.get("use_label_mask", False)),
                  **self.augmentation(model, hparams).params(),
                  **({"mem_limit_gb": float(hparams["mem_limit_gb"])} if "mem_limit_gb" in hparams else {}),
                  **{f"n_{k}_trials": len(v) for k, v in splits.as_dict().items()}}
        run_tags = {tags.TAG_MODEL_CLASS: model.model_class, tags.TAG_MODEL_TYPE: model.model_type}
        if isinstance(self.data, SessionGroup):
            run_tags[tags.TAG_SESSION_HASHES] = self.data.session_hashes
            run_tags[tags.TAG_N_SESSIONS] = len(self.sessions)
        return params, run_tags

    def fit(self, context: TrialContext) -> TrialResult:
        hparams = context.hparams
        model_config, training, compute = self.configs(hparams)
        if "mem_limit_gb" in hparams:
            needed = estimate_memory_gb(model_config, training.batch_size or max(max(s.n_frames) for s in self.sessions))
            if needed > float(hparams["mem_limit_gb"]):
                raise optuna.TrialPruned(f"skipped: this architecture needs about {needed:.1f} GB to train, "
                                         f"over mem_limit_gb {hparams['mem_limit_gb']}")
        splits, batches = self.batches(hparams, model_config, training.batch_size)
        device = resolve_device(compute.device)
        context.run.set_tags({"bnet.device": str(device), "bnet.precision": resolve_precision(compute.precision, device)})
        model, baseline = self.initial_model(model_config, batches)
        max_epochs = training.max_n_epochs

        def report(record: EpochRecord) -> None:
            metrics = {"train_loss": record.train_loss, "val_loss": record.val_loss,
                       "frames_per_s": record.frames / record.seconds,
                       **{f"train_{k}": v for k, v in record.train_terms.items()},
                       **{f"val_{k}": v for k, v in record.val_terms.items()}}
            context.report(record.epoch, metrics, max_epochs, shown=record.epoch + 1, state=record.state)

        result = fit(model, batches["train"], batches["val"], training, weight_decay=model_config.l2_reg,
                     device=device, precision=compute.precision, callbacks=[OnEpochEnd(report)],
                     augmentation=self.augmentation(model_config, hparams), resume=context.resume)
        test_terms = evaluate_terms(model, batches["test"], device)
        best = result.history[result.best_epoch]
        metrics = {"best_val_loss": result.best_val_loss, "best_epoch": result.best_epoch,
                   "train_loss_at_best": best.train_loss, "test_loss": test_terms.pop("loss"),
                   "n_epochs": len(result.history), "train_frames_per_s": result.frames_per_second,
                   "fit_seconds": result.train_seconds,
                   **{f"best_val_{k}": v for k, v in best.val_terms.items()},
                   **{f"test_{k}": v for k, v in test_terms.items()}}
        scored = batches  # with the masks where the session has them, for the animal's figure
        if self.has_masks and not hparams.get("use_output_mask"):
            _, scored = self.batches({**hparams, "use_output_mask": True}, model_config, training.batch_size)
        for split in ("train", "val", "test"):
            metrics.update({f"{split}_{k}": v for k, v in baseline.score(model, scored[split], device).items()})
        if "triplet" in best.train_terms:
            metrics["train_triplet_at_best"] = best.train_terms["triplet"]  # only mixed (training) batches have one
        outputs = {}
        if hasattr(model, "predict_labels"):  # label R², PS-VAE metrics and figures
            outputs = {name: self._outputs(model, batches[name], device) for name in ("train", "val", "test")}
            metrics.update(self._selection_metrics(model, outputs))
        self._log_artifacts(context, model, model_config, training, result, splits, device, metrics, outputs)
        return TrialResult(metrics, model, {"best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss})

    def initial_model(self, model_config: AEConfig, batches: dict[str, SessionBatches]) -> tuple[Any, MeanFrame]:
        """A new model ready to train (label readout fitted to the training labels, decoder
        at the mean frame) and the trivial answer: each session's mean training frame
        (bnet.models.frame_metrics)."""
        model = build_model(model_config)
        if hasattr(model, "initialize_label_readout"):
            train = [batches["train"][i] for i in range(len(batches["train"]))]
            labels = torch.cat([b["labels"] for b in train])
            model.initialize_label_readout(labels, torch.cat([label_mask(b["labels"], b.get("labels_masks"))
                                                              for b in train]))
        baseline = MeanFrame.of(batches["train"], len(self.sessions))
        model.start_at_mean_frame(torch.from_numpy(baseline.mean))
        return model, baseline

    @torch.no_grad()
    def _outputs(self, model, batches: SessionBatches, device) -> dict[str, np.ndarray]:
        """Latents, sessions, labels, their mask and the predicted labels of a split (for a
        class that predicts labels)."""
        model.to(device).eval()
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("latents", "session", "labels", "label_mask", "predicted")}
        for i in range(len(batches)):
            batch = {k: v.to(device) for k, v in batches[i].items()}
            latents = model.posterior(batch)[0].float()
            labels = batch["labels"]
            parts["latents"].append(latents.cpu().numpy())
            parts["session"].append(batch.get("session", torch.zeros(len(latents), dtype=torch.long)).cpu().numpy())
            parts["labels"].append(labels.cpu().numpy())
            parts["label_mask"].append(label_mask(labels, batch.get("labels_masks")).cpu().numpy())
            parts["predicted"].append(model.predict_labels(latents).float().cpu().numpy())
        return {k: np.concatenate(v) for k, v in parts.items()}

    def _selection_metrics(self, model, outputs: dict[str, dict[str, np.ndarray]]) -> dict[str, float]:
        metrics = {}
        for split in ("val", "test"):
            out = outputs[split]
            metrics[f"{split}_label_r2"] = float(r2_score(
                torch.from_numpy(out["predicted"]), torch.from_numpy(out["labels"]), torch.from_numpy(out["label_mask"])))
            if "unsupervised" in model.latent_groups():
                unsupervised = out["latents"][:, model.latent_groups()["unsupervised"]]
                metrics[f"{split}_unsup_corr"] = float(mean_abs_correlation(torch.from_numpy(unsupervised)))
                if len(self.sessions) > 1:
                    metrics[f"{split}_session_accuracy"] = session_accuracy(
                        outputs["train"]["latents"][:, model.latent_groups()["unsupervised"]],
                        outputs["train"]["session"], unsupervised, out["session"], len(self.sessions))
        if len(self.sessions) > 1 and "unsupervised" in model.latent_groups():
            metrics["session_accuracy_chance"] = 1.0 / len(self.sessions)
        return metrics

    def _log_artifacts(self, context, model, model_config, training, result, splits, device, metrics, outputs) -> None:
        run = context.run
        if training.export_latents and model.exports_latents:
            with tempfile.TemporaryDirectory() as tmp:
                for index, (session, session_split) in enumerate(zip(self.sessions, splits)):
                    latents = encode_session(model, session, device, index if len(self.sessions) > 1 else None,
                                             labels=bool(model_config.n_labels))
                    path = write_export(Path(tmp) / export_name("latents", session, self.data), {"latents": latents},
                                        session_split, {"run_id": run.run_id, "dataset": session.dataset_id,
                                                        "session_index": index})
                    run.log_file(path, tags.EXPORTS_DIR)
        if training.export_train_plots:
            history = result.history
            val = [(r.epoch, r.val_loss) for r in history if r.val_loss is not None]
            run.log_figure(plot_training_curves(
                [r.epoch for r in history], [r.train_loss for r in history],
                [e for e, _ in val], [v for _, v in val], result.best_epoch,
                f"{model_config.model_class} ({model_config.model_type}), {model_config.n_ae_latents} latents"),
                "training_curves")
            run.log_figure(self._reconstruction_figure(model, splits, device, metrics), "reconstructions")
            if "unsupervised" in model.latent_groups():
                from bnet.plotting.ps_vae import log_ps_vae_figures

                log_ps_vae_figures(run, model, self.sessions[0], splits[0], outputs, metrics["test_label_r2"], device,
                                   context.echo)

    def _reconstruction_figure(self, model, splits, device, metrics):
        rng = np.random.default_rng(0)
        session, split = self.sessions[0], splits[0]
        trials = list(split.test)
        picks = [(int(t), int(rng.integers(session.n_frames[session.trials.index(t)])))
                 for t in rng.choice(trials, size=min(6, len(trials) * 2), replace=len(trials) < 6)]
        frames = np.stack([session.read("images", t)[i] for t, i in picks]).astype(np.float32) / 255
        labels = (torch.from_numpy(np.stack([session.read("labels", t)[i] for t, i in picks]).astype(np.float32))
                  if model.config.n_labels else None)
        session_index = torch.zeros(len(picks), dtype=torch.long) if len(self.sessions) > 1 else None
        with torch.no_grad():
            model.to(device).eval()
            recon = model(torch.from_numpy(frames).to(device), session_index,
                          None if labels is None else labels.to(device))[0].float().cpu().numpy()
        return plot_reconstructions(frames, recon, [f"trial {t}, frame {i}" for t, i in picks],
                                    f"{session.dataset_id}: test frames (test loss {metrics['test_loss']:.5g}, "
                                    f"{100 * metrics['test_var_explained']:.1f}% of the frame variance explained)")


def session_accuracy(train_x: np.ndarray, train_sessions: np.ndarray, x: np.ndarray, sessions: np.ndarray,
                     n_sessions: int, steps: int = 300) -> float:
    """Held-out accuracy of a multinomial logistic regression telling sessions apart from
    latents (fitted on the training split, standardised with its statistics): near chance
    (1 / n_sessions) when the latents carry no session identity."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-8
    features = torch.from_numpy((train_x - mean) / std).float()
    targets = torch.from_numpy(train_sessions).long()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        classifier = torch.nn.Linear(features.shape[1], n_sessions)
    optimizer = torch.optim.LBFGS(classifier.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(classifier(features), targets) + 1e-3 * classifier.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predicted = classifier(torch.from_numpy((x - mean) / std).float()).argmax(1).numpy()
    return float((predicted == sessions).mean())


def prepare(request: StudyRequest, store: Store) -> list[PreparedStudy]:
    values = request.values
    require = ("images", "labels") if any(_uses_labels(c) for c in _model_classes(values)) else ("images",)
    if wants_several(values) and not request.data:
        data = select_sessions(values, require, fitted_sessions=lambda: fitted_datasets(store))
    else:
        data = open_session(resolve_data_path(values, request.data), require=require)
    check_image_shape(data, values)
    return [PreparedStudy(data, AETrials(data), OBJECTIVE)]


def expanded_fixed(fixed: dict[str, Any]) -> dict[str, Any]:
    """An architecture file as the architecture it holds: the same path may hold another
    architecture tomorrow, and another path the same one."""
    if not fixed.get("ae_arch_json"):
        return dict(fixed)
    return {**fixed, **{k: list(v) for k, v in architecture_from_json(fixed["ae_arch_json"]).items()}}


register_family(Family(
    name=FAMILY, default_space=DEFAULT_SPACE, default_budget=DEFAULT_BUDGET, conditions={},
    step_name="epoch", budget_key="max_n_epochs", prepare=prepare, default_model_class=lambda request: "ae",
    # the architecture a file names is fitted (conv_* params), not the file's path
    machinery=LOCATION_KEYS | {"export_latents", "export_train_plots", "sessions_csv", "all_source", "ae_arch_json"},
    expand_fixed=expanded_fixed, trivial=trivial.against_mean_frame,
    summary="Tune convolutional (or linear) autoencoders on one session.",
    behavenet_configs=("data", "model", "training", "compute"),
    shown_params=("model_type", "n_ae_latents", "learning_rate", "l2_reg"),
    population_based=True,
))


def tune_ae(data: str | Path | None = None, experiment: str | None = None,
            config: ProjectConfig | None = None, max_epochs: int | None = None, **options) -> StudyOutcome:
    """Run (or resume) an autoencoder study; the Python face of ``bnet tune ae``.

    ``max_epochs`` is ``max_n_epochs`` of every trial; ``options`` are those of
    :func:`bnet.tuning.tune.tune` (``n_trials``, ``sampler``, ``pruner``, ``seed``, ``study``,
    ``device``, ``store``, ``echo``). Unset values come from ``config``, then from
    :data:`DEFAULT_SPACE` (when the config searches nothing) and :data:`DEFAULT_BUDGET`.
    """
    from bnet.tuning.tune import tune

    return tune(FAMILY, data, experiment, config, max_steps=max_epochs, **options)[0]
