"""Pure PyTorch fitting: no MLflow, no Optuna. Progress reaches trackers through callbacks."""

from bnet.training.augment import Augmentation
from bnet.training.loop import (
    ComputeConfig, EpochRecord, FitResult, OnEpochEnd, TrainingCallback, TrainingConfig, TrainingState, evaluate,
    evaluate_terms, fit, make_optimizer, prepare, resolve_device, resolve_precision, train_step,
)

__all__ = [
    "Augmentation", "ComputeConfig", "EpochRecord", "FitResult", "OnEpochEnd", "TrainingCallback", "TrainingConfig",
    "TrainingState", "evaluate", "evaluate_terms", "fit", "make_optimizer", "prepare", "resolve_device",
    "resolve_precision", "train_step",
]
