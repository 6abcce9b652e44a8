"""Per-trial outputs of a run (latents, states, predictions) in the session layout.

One HDF5 file per run and session: ``<group>/trial_%04i`` datasets plus ``splits/train``,
``splits/val`` and ``splits/test`` (trial indices), so a downstream stage reads them the way
it reads a session file.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from bnet.data.session import trial_name
from bnet.data.splits import SPLIT_NAMES, TrialSplits
from bnet.errors import DataError


def write_export(path: str | Path, groups: dict[str, dict[int, np.ndarray]], splits: TrialSplits,
                 attrs: dict | None = None) -> Path:
    """Write ``{group: {trial: array}}`` and the splits to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs.update(attrs or {})
        for group, per_trial in groups.items():
            g = f.create_group(group)
            for trial, values in sorted(per_trial.items()):
                g.create_dataset(trial_name(trial), data=values)
        s = f.create_group("splits")
        for name in SPLIT_NAMES:
            s.create_dataset(name, data=np.asarray(splits[name], dtype=np.int64))
    return path


def read_export(path: str | Path, group: str) -> tuple[dict[int, np.ndarray], TrialSplits]:
    """``({trial: array}, splits)`` of one group of an export file."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if group not in f:
                raise DataError(f"{path}: no group '{group}' in this export")
            values = {int(name[len("trial_"):]): f[group][name][()] for name in f[group]}
            splits = TrialSplits(*(tuple(int(t) for t in f["splits"][n][()]) for n in SPLIT_NAMES))
    except OSError as err:
        raise DataError(f"{path}: cannot read export ({err})") from None
    return values, splits
