"""Session files, splits, torch datasets and the synthetic generator (no MLflow here)."""

from bnet.data.datasets import TrialBatches
from bnet.data.session import SIGNALS, Session, open_session, trial_name
from bnet.data.splits import SPLIT_NAMES, TrialSplits, parse_trial_splits, split_trials
from bnet.data.synth import SynthConfig, read_ground_truth, synthesize

__all__ = [
    "SIGNALS", "SPLIT_NAMES", "Session", "SynthConfig", "TrialBatches", "TrialSplits",
    "open_session", "parse_trial_splits", "read_ground_truth", "split_trials", "synthesize",
    "trial_name",
]
