"""Reading and validating BehaveNet session HDF5 files.

A session file holds one group per signal (``images``, ``masks``, ``labels``,
``labels_masks``, ``neural``) with one dataset per trial named ``trial_%04i``, an optional
``regions/<grouping>/<name>`` tree of neuron indices and, for synthetic data, a
``ground_truth`` group that readers skip. Everything is checked before any training starts
so that a bad file fails with a message naming the file, the group and the trial.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np

from bnet.errors import DataError

SIGNALS = ("images", "masks", "labels", "labels_masks", "neural")
"""Per-trial signal groups, in the order a summary lists them."""

SKIPPED_GROUPS = ("ground_truth",)
"""Groups readers never treat as signals (the synthetic generator's answers)."""

_TRIAL_NAME = re.compile(r"^trial_(\d{4,})$")

_EXPECTED_NDIM = {"images": 4, "masks": 4, "labels": 2, "labels_masks": 2, "neural": 2}
_SHAPE_TWIN = {"masks": "images", "labels_masks": "labels"}


def trial_name(index: int) -> str:
    """The dataset name of trial ``index`` (BehaveNet's ``trial_%04i``)."""
    return "trial_%04i" % index


@dataclass(frozen=True)
class Session:
    """A validated session file: what is in it, without loading the data.

    Attributes:
        path: the HDF5 file.
        dataset_id: ``lab/expt/animal/session`` from the file's attributes or its folders.
        signals: the signal groups present, in :data:`SIGNALS` order.
        trials: trial indices (the ``%04i`` of ``trial_%04i``), ascending.
        n_frames: frames per trial, aligned with ``trials``.
        image_shape: ``(C, Y, X)`` of the frames, or None without images.
        n_labels: label dimensions, or None.
        n_neurons: neurons, or None.
        regions: ``{grouping: {region: neuron indices}}``.
        follows_animal: the frames are windows that follow a freely moving animal without
            turning with it (``bnet data build --track-animal`` or ``--centre-on`` without
            ``--align``), so the animal faces every way in them.
    """

    path: Path
    dataset_id: str
    signals: tuple[str, ...]
    trials: tuple[int, ...]
    n_frames: tuple[int, ...]
    image_shape: tuple[int, int, int] | None = None
    n_labels: int | None = None
    n_neurons: int | None = None
    regions: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    follows_animal: bool = False

    @property
    def n_trials(self) -> int:
        return len(self.trials)

    @property
    def total_frames(self) -> int:
        return int(sum(self.n_frames))

    def read(self, signal: str, trial: int) -> np.ndarray:
        """One trial of one signal as stored (uint8 images stay uint8)."""
        if signal not in self.signals:
            raise DataError(f"{self.path}: no group '{signal}' (has {', '.join(self.signals)})")
        with h5py.File(self.path, "r") as f:
            return f[signal][trial_name(trial)][()]

    def read_all(self, signal: str, trials: list[int] | None = None) -> list[np.ndarray]:
        """Several trials of one signal in one open of the file."""
        if signal not in self.signals:
            raise DataError(f"{self.path}: no group '{signal}' (has {', '.join(self.signals)})")
        wanted = self.trials if trials is None else trials
        with h5py.File(self.path, "r") as f:
            group = f[signal]
            return [group[trial_name(t)][()] for t in wanted]

    @cached_property
    def masks_itemsize(self) -> int:
        """Bytes per value of the ``masks`` group (BehaveNet's are 0/1 bytes; ``bnet data build
        --masks`` writes float32 weights), 0 without masks."""
        if "masks" not in self.signals:
            return 0
        with h5py.File(self.path, "r") as f:
            return f["masks"][trial_name(self.trials[0])].dtype.itemsize

    @cached_property
    def data_hash(self) -> str:
        """The data identity every run records (:func:`file_digest`; read once per session
        object: the file can be large)."""
        return file_digest(self.path)


def file_digest(path: str | Path) -> str:
    """The first 16 hex digits of a file's sha256: the identity runs record for their data."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            sha.update(block)
    return sha.hexdigest()[:16]


def open_session(path: str | Path, require: tuple[str, ...] = ("images",)) -> Session:
    """Validate a session file and describe it.

    Args:
        path: the session HDF5 file.
        require: signal groups the caller needs; a missing one is an error.

    Raises:
        DataError: naming the file, group and trial at fault.
    """
    path = Path(path).absolute()  # runs record where the data is, from any folder
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        candidate = path / "data.hdf5"
        if not candidate.exists():
            raise DataError(f"{path}: is a folder without a data.hdf5 session file")
        path = candidate
    if not h5py.is_hdf5(path):
        raise DataError(f"{path}: not an HDF5 file")
    try:
        with h5py.File(path, "r") as f:
            return _describe(path, f, require)
    except OSError as err:
        raise DataError(f"{path}: cannot be read as HDF5 ({err})") from None


def _describe(path: Path, f: h5py.File, require: tuple[str, ...]) -> Session:
    for group in require:
        if group not in f:
            present = [g for g in SIGNALS if g in f]
            raise DataError(
                f"{path}: no group '{group}' (signals present: {', '.join(present) or 'none'})"
            )
    signals = tuple(s for s in SIGNALS if s in f)
    if not signals:
        raise DataError(f"{path}: no signal groups (expected one of {', '.join(SIGNALS)})")

    shapes: dict[str, dict[int, tuple[int, ...]]] = {}
    for signal in signals:
        shapes[signal] = _trial_shapes(path, f, signal)

    reference = signals[0]
    trials = sorted(shapes[reference])
    for signal in signals[1:]:
        missing = sorted(set(trials) - set(shapes[signal]))
        extra = sorted(set(shapes[signal]) - set(trials))
        if missing or extra:
            name = trial_name((missing or extra)[0])
            where = f"'{signal}'" if missing else f"'{reference}'"
            raise DataError(f"{path}: trial {name} is missing from group {where}")
        for t in trials:
            n_ref, n_sig = shapes[reference][t][0], shapes[signal][t][0]
            if n_ref != n_sig:
                raise DataError(
                    f"{path}: trial {trial_name(t)} has {n_ref} frames in '{reference}' "
                    f"but {n_sig} in '{signal}'"
                )

    for signal, twin in _SHAPE_TWIN.items():
        if signal in shapes and twin in shapes:
            for t in trials:
                if shapes[signal][t] != shapes[twin][t]:
                    raise DataError(
                        f"{path}: {signal}/{trial_name(t)} has shape {shapes[signal][t]} "
                        f"but {twin}/{trial_name(t)} has {shapes[twin][t]}"
                    )

    def common_trailing(signal: str) -> tuple[int, ...] | None:
        if signal not in shapes:
            return None
        first = shapes[signal][trials[0]][1:]
        for t in trials:
            if shapes[signal][t][1:] != first:
                raise DataError(
                    f"{path}: {signal}/{trial_name(t)} has shape {shapes[signal][t]}, "
                    f"unlike {signal}/{trial_name(trials[0])} {shapes[signal][trials[0]]}"
                )
        return first

    image_shape = common_trailing("images")
    common_trailing("masks")
    label_dims = common_trailing("labels")
    common_trailing("labels_masks")
    neural_dims = common_trailing("neural")
    n_neurons = neural_dims[0] if neural_dims else None

    return Session(
        path=path,
        dataset_id=_dataset_id(path, f),
        signals=signals,
        trials=tuple(trials),
        n_frames=tuple(shapes[reference][t][0] for t in trials),
        image_shape=tuple(image_shape) if image_shape else None,
        n_labels=label_dims[0] if label_dims else None,
        n_neurons=n_neurons,
        regions=_regions(path, f, n_neurons),
        follows_animal="animal_track" in f and not f["animal_track"].attrs.get("align", ""),
    )


def _trial_shapes(path: Path, f: h5py.File, signal: str) -> dict[int, tuple[int, ...]]:
    group = f[signal]
    if not isinstance(group, h5py.Group):
        raise DataError(f"{path}: '{signal}' is a dataset, expected a group of trial_%04i datasets")
    if len(group) == 0:
        raise DataError(f"{path}: group '{signal}' is empty")
    found: dict[int, tuple[int, ...]] = {}
    for name, item in group.items():
        match = _TRIAL_NAME.match(name)
        if not match or name != trial_name(int(match.group(1))):
            raise DataError(
                f"{path}: group '{signal}' holds '{name}', which is not a trial name "
                f"(expected trial_%04i, e.g. trial_0000)"
            )
        if not isinstance(item, h5py.Dataset):
            raise DataError(f"{path}: {signal}/{name} is a group, expected a dataset")
        ndim = _EXPECTED_NDIM[signal]
        if item.ndim != ndim:
            layout = "(T, C, Y, X)" if ndim == 4 else "(T, n)"
            raise DataError(
                f"{path}: {signal}/{name} has shape {item.shape}; expected {ndim}-D {layout}"
            )
        if signal == "images" and item.dtype != np.uint8:
            raise DataError(f"{path}: images/{name} has dtype {item.dtype}; expected uint8")
        if signal != "images" and not np.issubdtype(item.dtype, np.number):
            raise DataError(f"{path}: {signal}/{name} has non-numeric dtype {item.dtype}")
        if item.shape[0] == 0:
            raise DataError(f"{path}: {signal}/{name} has no frames")
        found[int(match.group(1))] = tuple(int(n) for n in item.shape)
    return found


def _regions(path: Path, f: h5py.File, n_neurons: int | None) -> dict[str, dict[str, np.ndarray]]:
    if "regions" not in f:
        return {}
    regions: dict[str, dict[str, np.ndarray]] = {}
    for grouping, members in f["regions"].items():
        if not isinstance(members, h5py.Group):
            raise DataError(f"{path}: regions/{grouping} must be a group of index datasets")
        regions[grouping] = {}
        for region, dataset in members.items():
            indices = np.ravel(dataset[()]).astype(np.int64)
            if n_neurons is not None and indices.size and (
                indices.min() < 0 or indices.max() >= n_neurons
            ):
                raise DataError(
                    f"{path}: regions/{grouping}/{region} indexes neurons outside 0..{n_neurons - 1}"
                )
            regions[grouping][region] = indices
    return regions


def _dataset_id(path: Path, f: h5py.File) -> str:
    parts = [f.attrs.get(key) for key in ("lab", "expt", "animal", "session")]
    if all(isinstance(p, (str, bytes)) and p for p in parts):
        return "/".join(p.decode() if isinstance(p, bytes) else p for p in parts)
    if path.name == "data.hdf5" and len(path.parents) > 4:
        return "/".join(p.name for p in reversed(path.parents[:4]))
    return path.stem
