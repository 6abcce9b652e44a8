"""The autoencoder family: studies of AEs on one session (``bnet tune ae``).

Everything about the inputs is checked before the first run is created (data file, config
keys, model class, search ranges, splits), so bad input leaves nothing in the store.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnet.config import Categorical, ProjectConfig, Range, dataclass_from_values
from bnet.data import TrialBatches, open_session
from bnet.data.exports import write_export
from bnet.data.session import Session
from bnet.errors import ConfigError, DataError
from bnet.models import build_model, model_entry
from bnet.models.ae import AEConfig
from bnet.plotting import plot_reconstructions, plot_training_curves
from bnet.tracking import conventions as tags
from bnet.tracking.store import Store
from bnet.training import ComputeConfig, EpochRecord, TrainingConfig, evaluate, fit, resolve_device, resolve_precision
from bnet.tuning.common import resolve_data_path, session_splits, split_settings, training_configs
from bnet.tuning.family import Family, Objective, PreparedStudy, StudyRequest, TrialResult, register_family
from bnet.tuning.study import StudyOutcome, TrialContext

FAMILY = "ae"
OBJECTIVE = Objective(metric="best_val_loss", direction="minimize", step_metric="val_loss")

# BehaveNet's recommended search when the user's config searches nothing.
DEFAULT_SPACE = {
    "n_ae_latents": Categorical((4, 8, 12, 16)),
    "learning_rate": Range(1e-5, 1e-3, log=True),
}
# Epoch budget where the user sets none (BehaveNet's 1,000 epochs is hours on a CPU): the
# conv AE leaves its mean-image plateau after ~5 epochs, the pruner cuts the laggards.
DEFAULT_BUDGET = {"max_n_epochs": 30, "min_n_epochs": 8, "early_stop_history": 5}


def _check_image_shape(session: Session, values: dict[str, Any]) -> None:
    for key, actual in zip(("n_input_channels", "y_pixels", "x_pixels"), session.image_shape):
        wanted = values.get(key)
        if wanted is not None and not isinstance(wanted, (Categorical, Range)) and int(wanted) != actual:
            raise DataError(f"{session.path}: images are {session.image_shape} (C, Y, X) but the config sets {key}={wanted}")


class AETrials:
    """Fits one autoencoder per trial on a session (the family's TrialFitter)."""

    def __init__(self, session: Session):
        self.session = session
        self._batches: dict[tuple, dict[str, TrialBatches]] = {}

    def configs(self, hparams: dict[str, Any]) -> tuple[AEConfig, TrainingConfig, ComputeConfig]:
        C, Y, X = self.session.image_shape
        model = dataclass_from_values(AEConfig, {**hparams, "n_input_channels": C, "y_pixels": Y, "x_pixels": X})
        model.validate()
        return (model, *training_configs(hparams))

    def batches(self, hparams: dict[str, Any], chunk: int | None) -> tuple[Any, dict[str, TrialBatches]]:
        splits = session_splits(self.session, hparams)
        signals = ("images", "masks") if hparams.get("use_output_mask") else ("images",)
        key = (splits, chunk, signals)
        if key not in self._batches:
            self._batches = {key: {name: TrialBatches(self.session, splits[name], signals, chunk)
                                   for name in ("train", "val", "test")}}
        return splits, self._batches[key]

    def check(self, hparams: dict[str, Any]) -> None:
        if model_entry(str(hparams.get("model_class", "ae"))).family != FAMILY:
            raise ConfigError(f"model_class '{hparams.get('model_class')}' is not an autoencoder")
        self.configs(hparams)
        session_splits(self.session, hparams)
        if hparams.get("use_output_mask") and "masks" not in self.session.signals:
            raise DataError(f"{self.session.path}: use_output_mask is set but there is no group 'masks'")

    def resolve(self, hparams: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        model, training, compute = self.configs(hparams)
        splits = session_splits(self.session, hparams)
        params = {**asdict(model), **asdict(training), **asdict(compute), **split_settings(hparams),
                  "use_output_mask": bool(hparams.get("use_output_mask", False)),
                  **{f"n_{k}_trials": len(v) for k, v in splits.as_dict().items()}}
        return params, {tags.TAG_MODEL_CLASS: model.model_class, tags.TAG_MODEL_TYPE: model.model_type}

    def fit(self, context: TrialContext) -> TrialResult:
        hparams = context.hparams
        model_config, training, compute = self.configs(hparams)
        splits, batches = self.batches(hparams, training.batch_size)
        device = resolve_device(compute.device)
        context.run.set_tags({"bnet.device": str(device), "bnet.precision": resolve_precision(compute.precision, device)})
        model = build_model(model_config)
        max_epochs = training.max_n_epochs

        class Progress:
            def on_epoch_end(self, record: EpochRecord) -> None:
                context.report(record.epoch, {"train_loss": record.train_loss, "val_loss": record.val_loss,
                                              "frames_per_s": record.frames / record.seconds},
                               max_epochs, shown=record.epoch + 1)

        result = fit(model, batches["train"], batches["val"], training, weight_decay=model_config.l2_reg,
                     device=device, precision=compute.precision, callbacks=[Progress()])
        test_loss = evaluate(model, batches["test"], device)
        best = result.history[result.best_epoch]
        metrics = {"best_val_loss": result.best_val_loss, "best_epoch": result.best_epoch,
                   "train_loss_at_best": best.train_loss, "test_loss": test_loss,
                   "n_epochs": len(result.history), "train_frames_per_s": result.frames_per_second,
                   "fit_seconds": result.train_seconds}
        self._log_artifacts(context, model, model_config, training, result, splits, device, metrics)
        return TrialResult(metrics, model, {"best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss})

    def _log_artifacts(self, context, model, model_config, training, result, splits, device, metrics) -> None:
        run = context.run
        if training.export_latents:
            with tempfile.TemporaryDirectory() as tmp:
                latents = encode_session(model, self.session, device)
                path = write_export(Path(tmp) / "latents.hdf5", {"latents": latents}, splits,
                                    {"run_id": run.run_id, "dataset": self.session.dataset_id})
                run.log_file(path, tags.EXPORTS_DIR)
        if training.export_train_plots:
            history = result.history
            val = [(r.epoch, r.val_loss) for r in history if r.val_loss is not None]
            run.log_figure(plot_training_curves(
                [r.epoch for r in history], [r.train_loss for r in history],
                [e for e, _ in val], [v for _, v in val], result.best_epoch,
                f"{model_config.model_type} AE, {model_config.n_ae_latents} latents"), "training_curves")
            run.log_figure(self._reconstruction_figure(model, splits, device, metrics), "reconstructions")

    def _reconstruction_figure(self, model, splits, device, metrics):
        rng = np.random.default_rng(0)
        trials = list(splits.test)
        picks = [(int(t), int(rng.integers(self.session.n_frames[self.session.trials.index(t)])))
                 for t in rng.choice(trials, size=min(6, len(trials) * 2), replace=len(trials) < 6)]
        frames = np.stack([self.session.read("images", t)[i] for t, i in picks]).astype(np.float32) / 255
        with torch.no_grad():
            recon = model.to(device).eval()(torch.from_numpy(frames).to(device))[0].float().cpu().numpy()
        return plot_reconstructions(frames, recon, [f"trial {t}, frame {i}" for t, i in picks],
                                    f"test frames (test loss {metrics['test_loss']:.5f})")


@torch.no_grad()
def encode_session(model, session: Session, device: torch.device, chunk: int = 256) -> dict[int, np.ndarray]:
    """Latents (T, n_latents) of every trial of a session."""
    model.to(device).eval()
    batches = TrialBatches(session, session.trials, ("images",), chunk)
    latents: dict[int, list[np.ndarray]] = {t: [] for t in session.trials}
    for i, (trial, _, _) in enumerate(batches.index):
        images = batches[i]["images"].to(device).contiguous(memory_format=torch.channels_last)
        latents[trial].append(model.encode(images).float().cpu().numpy())
    return {t: np.concatenate(parts) for t, parts in latents.items()}


def prepare(request: StudyRequest, store: Store) -> list[PreparedStudy]:
    session = open_session(resolve_data_path(request.values, request.data), require=("images",))
    _check_image_shape(session, request.values)
    return [PreparedStudy(session, AETrials(session), OBJECTIVE)]


register_family(Family(
    name=FAMILY, default_space=DEFAULT_SPACE, default_budget=DEFAULT_BUDGET, conditions={},
    step_name="epoch", budget_key="max_n_epochs", prepare=prepare, default_model_class=lambda request: "ae",
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
