"""Figures from arrays (matplotlib, Agg backend): no MLflow, no training."""

from bnet.plotting.figures import plot_reconstructions, plot_training_curves

__all__ = ["plot_reconstructions", "plot_training_curves"]
