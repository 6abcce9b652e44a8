"""Macaque M1 spikes and hand velocity as a neural-only session, and its ridge floor.

The recording (Stevenson et al. 2011, via spykesML; see ``shared/data/spykesml_m1_s1``)
is one continuous stretch of 50 ms bins with no trial structure. bnet's splits and
batches work on trials, so it is cut into consecutive pseudo-trials of equal length.
Decoding ``handVel`` from spikes stands in for decoding AE latents (no video exists).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import scipy.io

from bnet.data.session import trial_name
from bnet.errors import ConfigError, DataError
from bnet.models.decoder_metrics import r2_score

BIN_SECONDS = 0.05
SESSION_ATTRS = {"lab": "miller", "expt": "stevenson-2011", "animal": "macaque", "session": "m1"}


def load_m1_recording(mat_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Spike counts ``(T, 171)`` and hand velocity ``(T, 2)`` (x, y) of the M1 .mat file.

    ``handVel``'s third row (z) is constant and dropped.

    Raises:
        DataError: the file is missing or unreadable, or lacks ``spikes`` or ``handVel``,
            or their bin counts differ.
    """
    mat_path = Path(mat_path)
    if not mat_path.is_file():
        raise DataError(f"{mat_path}: no such file")
    try:
        content = scipy.io.loadmat(mat_path, variable_names=("spikes", "handVel"))
    # Damaged or foreign files raise MatReadError or ValueError; v7.3 (HDF5) files NotImplementedError.
    except (scipy.io.matlab.MatReadError, ValueError, OSError, NotImplementedError) as err:
        raise DataError(f"{mat_path}: cannot be read as a MATLAB file ({type(err).__name__}: {err})") from None
    for key in ("spikes", "handVel"):
        if key not in content:
            raise DataError(f"{mat_path}: no variable '{key}' (expected 'spikes' and 'handVel')")
    spikes, velocity = content["spikes"], content["handVel"]
    if spikes.ndim != 2 or velocity.ndim != 2 or velocity.shape[0] < 2:
        raise DataError(
            f"{mat_path}: 'spikes' {spikes.shape} and 'handVel' {velocity.shape} should be "
            f"(neurons, bins) and (3, bins)"
        )
    if spikes.shape[1] != velocity.shape[1]:
        raise DataError(
            f"{mat_path}: 'spikes' has {spikes.shape[1]} bins but 'handVel' has {velocity.shape[1]}"
        )
    return spikes.T.astype(np.float32), velocity[:2].T.astype(np.float32)


def build_m1_session(mat_path: str | Path, out_path: str | Path, trial_frames: int = 100,
                     max_trials: int | None = None) -> Path:
    """Write the M1 recording as a session: ``neural`` spikes and ``labels`` hand velocity.

    Consecutive pseudo-trials of ``trial_frames`` bins (the remainder is dropped): 15536
    bins give 155 trials of 100; ``max_trials`` keeps the first ones only (a smaller
    problem for benchmarks and tests).

    Returns:
        ``out_path``.
    """
    if trial_frames < 1:
        raise ConfigError(f"trial_frames must be at least 1, got {trial_frames}")
    spikes, velocity = load_m1_recording(mat_path)
    n_trials = min(len(spikes) // trial_frames, max_trials or len(spikes))
    if n_trials == 0:
        raise DataError(f"{mat_path}: {len(spikes)} bins are fewer than one trial of {trial_frames}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(out_path, "w") as f:
        f.attrs.update({**SESSION_ATTRS, "bin_seconds": BIN_SECONDS, "source": Path(mat_path).name})
        neural, labels = f.create_group("neural"), f.create_group("labels")
        for trial in range(n_trials):
            frames = slice(trial * trial_frames, (trial + 1) * trial_frames)
            neural.create_dataset(trial_name(trial), data=spikes[frames])
            labels.create_dataset(trial_name(trial), data=velocity[frames])
    return out_path


def lag_window(x: np.ndarray, lags: int) -> np.ndarray:
    """``(T, D)`` -> ``(T, (2 * lags + 1) * D)``: frames t-lags..t+lags side by side, zero-padded.

    The same window and padding as a decoder's first layer with ``n_lags = lags``.
    """
    padded = np.pad(x, ((lags, lags), (0, 0)))
    return np.concatenate([padded[shift : shift + len(x)] for shift in range(2 * lags + 1)], axis=1)


def ridge_floor(
    spikes: np.ndarray,
    velocity: np.ndarray,
    lags: int = 3,
    train_fraction: float = 0.8,
    alpha: float = 1.0,
) -> np.ndarray:
    """Held-out R² per dimension of ridge regression on a window of spikes.

    Fits on the first ``train_fraction`` of the bins and scores the rest, features being
    the raw counts in a ±``lags`` window (:func:`lag_window`), centred on the training
    mean, with an unpenalised intercept. The default ``alpha = 1.0`` (sklearn's default)
    reproduces ``shared/data/README.md``'s floor: R² 0.794 (x) and 0.672 (y) against the
    README's 0.79 and 0.68. The floor barely moves for alpha from 0 to 100 (within 0.01).

    Args:
        spikes: ``(T, n_neurons)`` counts.
        velocity: ``(T, D)`` targets.
    """
    features = lag_window(np.asarray(spikes, dtype=np.float64), lags)
    velocity = np.asarray(velocity, dtype=np.float64)
    n_train = int(train_fraction * len(features))
    if not 0 < n_train < len(features):
        raise ConfigError(f"train_fraction {train_fraction} leaves no training or no held-out bins")
    feature_mean, target_mean = features[:n_train].mean(axis=0), velocity[:n_train].mean(axis=0)
    train = features[:n_train] - feature_mean
    gram = train.T @ train + alpha * np.eye(train.shape[1])
    weights = np.linalg.solve(gram, train.T @ (velocity[:n_train] - target_mean))
    predicted = (features[n_train:] - feature_mean) @ weights + target_mean
    return r2_score(velocity[n_train:], predicted)[1]
