"""`bnet tune ae`: an Optuna study of autoencoders on one session.

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

from bnet.config import ProjectConfig, dataclass_from_values
from bnet.data import TrialBatches, open_session, split_trials
from bnet.data.exports import write_export
from bnet.data.session import Session
from bnet.errors import ConfigError, DataError
from bnet.models import build_model, model_entry, save_checkpoint
from bnet.models.ae import AEConfig
from bnet.plotting import plot_reconstructions, plot_training_curves
from bnet.tracking import conventions as tags
from bnet.tracking.store import Store, resolve_store
from bnet.training import ComputeConfig, EpochRecord, TrainingConfig, evaluate, fit, resolve_device, resolve_precision
from bnet.tuning.common import apply_options, check_every_choice, resolve_data_path, resolve_experiment, session_tags
from bnet.tuning.study import Echo, StudyOutcome, StudySpec, TrialContext, run_study

FAMILY = "ae"


def _check_image_shape(session: Session, values: dict[str, Any]) -> None:
    for key, actual in zip(("n_input_channels", "y_pixels", "x_pixels"), session.image_shape):
        wanted = values.get(key)
        if wanted is not None and not isinstance(wanted, (list, tuple)) and int(wanted) != actual:
            raise DataError(f"{session.path}: images are {session.image_shape} (C, Y, X) but the config sets {key}={wanted}")


class AETrials:
    """Fits one autoencoder per trial on a session and logs it (the study's FitTrial)."""

    def __init__(self, session: Session):
        self.session = session
        self._batches: dict[tuple, dict[str, TrialBatches]] = {}

    def configs(self, hparams: dict[str, Any]) -> tuple[AEConfig, TrainingConfig, ComputeConfig]:
        C, Y, X = self.session.image_shape
        model = dataclass_from_values(AEConfig, {**hparams, "n_input_channels": C, "y_pixels": Y, "x_pixels": X})
        model.validate()
        training = dataclass_from_values(TrainingConfig, hparams)
        training.validate()
        compute = dataclass_from_values(ComputeConfig, hparams)
        compute.validate()
        return model, training, compute

    @staticmethod
    def split_settings(hparams: dict[str, Any]) -> dict[str, Any]:
        return {"trial_splits": str(hparams.get("trial_splits", "8;1;1;0")),
                "rng_seed_data": int(hparams.get("rng_seed_data", 0)),
                "train_frac": float(hparams.get("train_frac", 1.0))}

    def splits(self, hparams: dict[str, Any]):
        return split_trials(self.session.trials, **self.split_settings(hparams), source=str(self.session.path))

    def batches(self, hparams: dict[str, Any], chunk: int | None) -> tuple[Any, dict[str, TrialBatches]]:
        splits = self.splits(hparams)
        signals = ("images", "masks") if hparams.get("use_output_mask") else ("images",)
        key = (splits, chunk, signals)
        if key not in self._batches:
            self._batches = {key: {name: TrialBatches(self.session, splits[name], signals, chunk)
                                   for name in ("train", "val", "test")}}
        return splits, self._batches[key]

    def check(self, hparams: dict[str, Any]) -> None:
        """Fail before anything is logged if this point of the space cannot be fitted."""
        if model_entry(str(hparams.get("model_class", "ae"))).family != FAMILY:
            raise ConfigError(f"model_class '{hparams.get('model_class')}' is not an autoencoder")
        self.configs(hparams)
        self.splits(hparams)
        if hparams.get("use_output_mask") and "masks" not in self.session.signals:
            raise DataError(f"{self.session.path}: use_output_mask is set but there is no group 'masks'")

    def __call__(self, context: TrialContext) -> dict[str, float]:
        hparams = context.hparams
        model_config, training, compute = self.configs(hparams)
        splits, batches = self.batches(hparams, training.batch_size)
        device = resolve_device(compute.device)
        context.run.set_tags({tags.TAG_MODEL_CLASS: model_config.model_class,
                              tags.TAG_MODEL_TYPE: model_config.model_type, "bnet.device": str(device),
                              "bnet.precision": resolve_precision(compute.precision, device)})
        resolved = {**asdict(model_config), **asdict(training), **asdict(compute),
                    **self.split_settings(hparams),
                    **{f"n_{k}_trials": len(v) for k, v in splits.as_dict().items()}}
        context.run.log_params({k: v for k, v in resolved.items() if k not in hparams})
        context.run.log_dataset(self.session.path, self.session.dataset_id, self.session.data_hash)
        model = build_model(model_config)
        echo, max_epochs = context.echo, training.max_n_epochs

        class Progress:
            def on_epoch_end(self, record: EpochRecord) -> None:
                metrics = {"train_loss": record.train_loss, "val_loss": record.val_loss,
                           "epoch_seconds": record.seconds}
                val = f"{record.val_loss:.5f}" if record.val_loss is not None else "-"
                echo(f"  trial {context.number} epoch {record.epoch + 1}/{max_epochs}  "
                     f"train {record.train_loss:.5f}  val {val}  "
                     f"({record.frames / record.seconds:.0f} frames/s)")
                context.on_epoch_end(record.epoch, metrics)

        result = fit(model, batches["train"], batches["val"], training, weight_decay=model_config.l2_reg,
                     device=device, precision=compute.precision, callbacks=[Progress()])
        test_loss = evaluate(model, batches["test"], device)
        best = result.history[result.best_epoch]
        metrics = {"best_val_loss": result.best_val_loss, "best_epoch": result.best_epoch,
                   "train_loss_at_best": best.train_loss, "test_loss": test_loss,
                   "n_epochs": len(result.history), "train_frames_per_s": result.frames_per_second,
                   "fit_seconds": result.train_seconds}
        self._log_artifacts(context, model, model_config, training, result, splits, device, metrics)
        return metrics

    def _log_artifacts(self, context, model, model_config, training, result, splits, device, metrics) -> None:
        run = context.run
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = save_checkpoint(
                Path(tmp) / "model.pt", model,
                {"run_id": run.run_id, "dataset": self.session.dataset_id, "data_hash": self.session.data_hash,
                 "best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss},
            )
            run.log_file(checkpoint, "checkpoint")
            if training.export_latents:
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


def tune_ae(
    data: str | Path | None = None,
    experiment: str | None = None,
    config: ProjectConfig | None = None,
    n_trials: int | None = None,
    max_epochs: int | None = None,
    sampler: str | None = None,
    pruner: str | None = None,
    seed: int | None = None,
    device: str | None = None,
    study: str | None = None,
    store: Store | None = None,
    echo: Echo = print,
) -> StudyOutcome:
    """Run (or resume) an autoencoder study; the Python face of ``bnet tune ae``.

    Arguments left as None come from ``config`` (a :class:`ProjectConfig`), then defaults.
    """
    config = config or ProjectConfig()
    tuning = apply_options(config, {"n_trials": n_trials, "sampler": sampler, "pruner": pruner,
                                    "seed": seed, "study": study},
                           {"max_n_epochs": max_epochs, "device": device})
    experiment = resolve_experiment(experiment, config)
    values = config.values
    values.setdefault("model_class", "ae")
    session = open_session(resolve_data_path(values, data), require=("images",))
    _check_image_shape(session, values)
    values["data"] = str(session.path)
    trials = AETrials(session)
    check_every_choice(config, trials.check)

    spec = StudySpec(
        experiment=experiment, family=FAMILY, tuning=tuning, fixed=config.fixed(), dimensions=config.dimensions(),
        store=store or resolve_store(),
        run_tags=session_tags(session),
    )
    return run_study(spec, trials, echo)


