"""Pure PyTorch fitting: no MLflow, no Optuna. Progress reaches trackers through callbacks."""

from bnet.training.loop import (
    ComputeConfig, EpochRecord, FitResult, OnEpochEnd, TrainingCallback, TrainingConfig, evaluate, evaluate_terms,
    fit, make_optimizer, prepare, resolve_device, resolve_precision, train_step,
)

__all__ = [
    "ComputeConfig", "EpochRecord", "FitResult", "OnEpochEnd", "TrainingCallback", "TrainingConfig", "evaluate",
    "evaluate_terms", "fit", "make_optimizer", "prepare", "resolve_device", "resolve_precision", "train_step",
]
