"""Optuna studies and their objectives (one module per model family)."""
