"""Pure PyTorch fitting: no MLflow, no Optuna. Progress reaches trackers through callbacks."""

from bnet.training.loop import EpochRecord, FitResult, TrainingCallback, TrainingConfig, evaluate, fit, resolve_device

__all__ = ["EpochRecord", "FitResult", "TrainingCallback", "TrainingConfig", "evaluate", "fit", "resolve_device"]
