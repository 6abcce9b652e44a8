"""Top-N ensembles of study runs, N chosen on validation, and their re-validation."""

from bnet.ensemble.build import EnsembleOutcome, build_ensemble, verify_ensemble

__all__ = ["EnsembleOutcome", "build_ensemble", "verify_ensemble"]
