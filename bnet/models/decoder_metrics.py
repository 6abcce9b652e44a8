"""Scores of decoder predictions, in plain NumPy (no torch), as BehaveNet reports them.

Every function takes frames along the first axis. Decoders see a window of ``n_lags``
frames either side, so the first and last frames of a trial are predicted from zero
padding; :func:`score_trials` drops ``n_max_lags`` frames at both ends of each trial
before pooling, so models with different lags are scored on the same frames.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.special import gammaln


def r2_score(true: np.ndarray, pred: np.ndarray) -> tuple[float, np.ndarray]:
    """Coefficient of determination, variance-weighted and per dimension.

    Args:
        true, pred: ``(T, D)`` (or ``(T,)`` for one dimension).

    Returns:
        ``(r2, r2_per_dim)``: ``1 - sum(SSE) / sum(SST)`` over all dimensions (so each
        dimension weighs by its variance, sklearn's ``variance_weighted``), and the
        ``(D,)`` R² of each dimension on its own: NaN for a dimension constant over these
        frames (a neuron silent in a held-out split), where R² is undefined.
    """
    true = np.asarray(true, dtype=np.float64).reshape(len(true), -1)
    pred = np.asarray(pred, dtype=np.float64).reshape(len(pred), -1)
    if true.shape != pred.shape:
        raise ValueError(f"true {true.shape} and pred {pred.shape} differ in shape")
    residual = ((true - pred) ** 2).sum(axis=0)
    total = ((true - true.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_dim = np.where(total > 0, 1.0 - residual / total, np.nan)
    return float(1.0 - residual.sum() / total.sum()), per_dim


def accuracy(true_states: np.ndarray, probs: np.ndarray) -> float:
    """Share of frames whose most probable class is the true one (``(T,)`` vs ``(T, K)``)."""
    return float(np.mean(np.argmax(probs, axis=1) == np.asarray(true_states)))


def categorical_log_likelihood(true_states: np.ndarray, probs: np.ndarray) -> float:
    """Mean log-probability per frame of the true class (``-inf`` where it got probability 0)."""
    states = np.asarray(true_states, dtype=np.int64)
    with np.errstate(divide="ignore"):
        return float(np.mean(np.log(np.asarray(probs)[np.arange(len(states)), states])))


def poisson_log_likelihood(counts: np.ndarray, rates: np.ndarray) -> float:
    """Exact Poisson log-likelihood of ``counts`` under ``rates``, mean per frame and dimension."""
    counts = np.asarray(counts, dtype=np.float64)
    rates = np.asarray(rates, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        # 0 * log(0) is 0: a zero rate is certain of a zero count.
        count_term = np.where(counts > 0, counts * np.log(rates), 0.0)
    return float(np.mean(count_term - rates - gammaln(counts + 1)))


def trim_lags(trials: Sequence[np.ndarray], n_max_lags: int) -> list[np.ndarray]:
    """Each trial without its first and last ``n_max_lags`` frames."""
    if n_max_lags < 0:
        raise ValueError(f"n_max_lags must be non-negative, got {n_max_lags}")
    trimmed = [np.asarray(trial)[n_max_lags : len(trial) - n_max_lags] for trial in trials]
    if not any(len(trial) for trial in trimmed):
        raise ValueError(f"no frames left to score after dropping n_max_lags={n_max_lags} at each end")
    return trimmed


def score_trials(
    metric: Callable[[np.ndarray, np.ndarray], object],
    true_trials: Sequence[np.ndarray],
    pred_trials: Sequence[np.ndarray],
    n_max_lags: int = 0,
):
    """``metric`` over the frames of all trials pooled, after :func:`trim_lags` on each.

    Example: ``score_trials(r2_score, true_latents, predicted_latents, n_max_lags=8)``.
    """
    if len(true_trials) != len(pred_trials):
        raise ValueError(f"{len(true_trials)} true trials but {len(pred_trials)} predicted")
    true = np.concatenate(trim_lags(true_trials, n_max_lags))
    pred = np.concatenate(trim_lags(pred_trials, n_max_lags))
    return metric(true, pred)
