"""Pose-estimation output as labels: DeepLabCut and lightning-pose CSV, SLEAP analysis HDF5,
DeepLabCut HDF5, plain CSV and NPY.

Every reader returns :class:`Pose`: ``(frames, keypoints, 2)`` positions in the source
video's pixels (NaN where a keypoint was not found or fell below ``min_likelihood``), the
keypoint names, and for a table of labelled stills the image file of each row.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnet.errors import DataError

FORMATS = ("dlc-csv", "sleap", "dlc-h5", "csv", "npy")
STILL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""``dlc-csv`` also reads lightning-pose CSV (the same 3-row header, or 4 rows with individuals)."""


@dataclass
class Pose:
    """Keypoint positions per frame.

    Attributes:
        xy: ``(frames, keypoints, 2)`` float32 positions in source pixels, NaN where missing.
        names: one name per keypoint (``individual_bodypart`` for several individuals).
        images: for a table of labelled stills, the image file of each row (else None).
    """

    xy: np.ndarray
    names: list[str]
    images: list[Path] | None = None

    @property
    def n_frames(self) -> int:
        return len(self.xy)

    def select(self, names: list[str], source: str) -> "Pose":
        """Only the keypoints ``names``, in that order."""
        missing = [n for n in names if n not in self.names]
        if missing:
            raise DataError(f"{source}: no keypoint(s) {', '.join(missing)} (has {', '.join(self.names)})")
        return Pose(self.xy[:, [self.names.index(n) for n in names]], list(names), self.images)

    def first(self, n_frames: int) -> "Pose":
        """Only the first ``n_frames`` rows (all of them where there are fewer)."""
        return Pose(self.xy[:n_frames], self.names, None if self.images is None else self.images[:n_frames])

    def flat_names(self) -> list[str]:
        return [f"{n}_x" for n in self.names] + [f"{n}_y" for n in self.names]


def flat_labels(xy: np.ndarray) -> np.ndarray:
    """``(frames, keypoints, 2)`` -> ``(frames, 2 * keypoints)``: all x, then all y (BehaveNet's
    label order, as :meth:`Pose.flat_names` names them)."""
    return np.concatenate([xy[..., 0], xy[..., 1]], axis=1).astype(np.float32)


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return "npy"
    if suffix in (".h5", ".hdf5", ".slp"):
        import h5py

        try:
            with h5py.File(path, "r") as f:
                return "sleap" if "tracks" in f else "dlc-h5"
        except OSError as err:
            raise DataError(f"{path}: not a readable HDF5 file ({err})") from None
    if suffix == ".csv":
        first = _first_cells(path)
        return "dlc-csv" if first and first[0].strip().lower() == "scorer" else "csv"
    raise DataError(f"{path}: unknown label format '{suffix or path.name}' (known: DeepLabCut/lightning-pose .csv "
                    f"or .h5, SLEAP analysis .h5, plain .csv or .npy)")


def read_pose(path: str | Path, fmt: str | None = None, min_likelihood: float | None = None) -> Pose:
    """The labels in ``path`` (format detected from the file unless ``fmt`` names one of
    :data:`FORMATS`); keypoints whose likelihood column is below ``min_likelihood`` are NaN."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such labels file")
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown label format '{fmt}' (known: {', '.join(FORMATS)})")
    reader = {"dlc-csv": _dlc_csv, "sleap": _sleap, "dlc-h5": _dlc_h5, "csv": _plain_csv, "npy": _npy}[fmt]
    pose = reader(path, min_likelihood)
    if pose.n_frames == 0:
        raise DataError(f"{path}: holds no labelled frames")
    return pose


def _first_cells(path: Path) -> list[str]:
    with path.open(newline="") as f:
        return next(csv.reader(f), [])


def _dlc_csv(path: Path, min_likelihood: float | None) -> Pose:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    header = []
    for row in rows:
        if row and row[0].strip().lower() in ("scorer", "individuals", "bodyparts", "coords"):
            header.append(row)
        else:
            break
    kinds = [row[0].strip().lower() for row in header]
    if "bodyparts" not in kinds or "coords" not in kinds:
        raise DataError(f"{path}: a DeepLabCut CSV needs header rows 'bodyparts' and 'coords' (has {', '.join(kinds)})")
    body = [row for row in rows[len(header):] if row and any(cell.strip() for cell in row)]
    if body and body[0][0].strip().lower() == "frame":  # pandas' index-name row (multi-animal files)
        body = body[1:]
    columns = list(zip(*(row[1:] for row in header)))
    try:
        values = np.array([[float(cell) if cell.strip() else np.nan for cell in row[1:]] for row in body])
    except ValueError as err:
        raise DataError(f"{path}: a label value is not a number ({err})") from None
    if values.ndim != 2 or values.shape[1] != len(columns):
        raise DataError(f"{path}: rows have {values.shape[-1] if values.ndim == 2 else 'varying'} values but the "
                        f"header names {len(columns)} columns")
    xy, names = _keypoints(path, kinds, columns, values, min_likelihood)
    index = [row[0] for row in body]
    images = None
    if index and all(Path(i).suffix.lower() in STILL_SUFFIXES for i in index):
        images = [_still_path(path, i) for i in index]
    return Pose(xy, names, images)


def _still_path(table: Path, name: str) -> Path:
    """A still named in a label table: relative to the table's folder, or to its parent (DLC
    writes ``labeled-data/<video>/imgNN.png`` relative to the project)."""
    for root in (table.parent, table.parent.parent, table.parent.parent.parent):
        if (root / name).is_file():
            return root / name
    return table.parent / name


def _sleap(path: Path, min_likelihood: float | None) -> Pose:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            tracks = f["tracks"][()]  # (tracks, xy, nodes, frames) as SLEAP stores it
            nodes = [n.decode() if isinstance(n, bytes) else str(n) for n in f["node_names"][()]]
            scores = f["point_scores"][()] if "point_scores" in f and min_likelihood is not None else None
    except (OSError, KeyError) as err:
        raise DataError(f"{path}: not a SLEAP analysis file (needs datasets tracks, node_names): {err}") from None
    n_tracks = tracks.shape[0]
    xy = np.transpose(tracks, (3, 0, 2, 1)).reshape(tracks.shape[3], n_tracks * len(nodes), 2).astype(np.float32)
    if scores is not None:  # (tracks, nodes, frames)
        low = np.transpose(scores, (2, 0, 1)).reshape(len(xy), -1) < min_likelihood
        xy[low] = np.nan
    names = nodes if n_tracks == 1 else [f"track{t}_{n}" for t in range(n_tracks) for n in nodes]
    return Pose(xy, names)


def _dlc_h5(path: Path, min_likelihood: float | None) -> Pose:
    try:
        import pandas as pd

        frame = pd.read_hdf(path)
    except ImportError as err:
        raise DataError(f"{path}: reading DeepLabCut .h5 needs PyTables ({err}); use the .csv DeepLabCut writes "
                        f"beside it, or pip install tables") from None
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{path}: not a DeepLabCut .h5 table ({err})") from None
    levels = [str(n).lower() for n in frame.columns.names]
    if "bodyparts" not in levels or "coords" not in levels:
        raise DataError(f"{path}: a DeepLabCut table needs column levels bodyparts and coords (has {levels})")
    columns = [tuple(str(c) for c in column) for column in frame.columns]
    return Pose(*_keypoints(path, levels, columns, frame.to_numpy(dtype=np.float64), min_likelihood))


def _keypoints(path: Path, levels: list[str], columns: list[tuple[str, ...]], values: np.ndarray,
               min_likelihood: float | None) -> tuple[np.ndarray, list[str]]:
    """DeepLabCut's column levels (individuals?, bodyparts, coords) -> (xy, names)."""
    individual = levels.index("individuals") if "individuals" in levels else None
    part, coord = levels.index("bodyparts"), levels.index("coords")
    names, where = [], {}
    for i, column in enumerate(columns):
        name = column[part] if individual is None else f"{column[individual]}_{column[part]}"
        if name not in where:
            names.append(name)
            where[name] = {}
        where[name][column[coord].strip().lower()] = i
    xy = np.full((len(values), len(names), 2), np.nan, dtype=np.float32)
    for k, name in enumerate(names):
        found = where[name]
        if "x" not in found or "y" not in found:
            raise DataError(f"{path}: keypoint '{name}' lacks an x or y column")
        xy[:, k, 0], xy[:, k, 1] = values[:, found["x"]], values[:, found["y"]]
        if min_likelihood is not None and "likelihood" in found:
            xy[values[:, found["likelihood"]] < min_likelihood, k] = np.nan
    return xy, names


def _plain_csv(path: Path, min_likelihood: float | None) -> Pose:
    with path.open(newline="") as f:
        rows = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
    names = None
    try:
        float(rows[0][0])
    except (ValueError, IndexError):
        names, rows = rows[0], rows[1:]
    try:
        values = np.array([[float(cell) if cell.strip() else np.nan for cell in row] for row in rows], dtype=np.float32)
    except ValueError as err:
        raise DataError(f"{path}: a label value is not a number ({err})") from None
    return _pairs(path, values, names)


def _npy(path: Path, min_likelihood: float | None) -> Pose:
    try:
        values = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise DataError(f"{path}: not a plain NumPy array ({err})") from None
    if values.ndim == 3 and values.shape[2] == 2:
        return Pose(values.astype(np.float32), [f"point{k}" for k in range(values.shape[1])])
    return _pairs(path, values.astype(np.float32), None)


def _pairs(path: Path, values: np.ndarray, header: list[str] | None) -> Pose:
    """Columns x0, y0, x1, y1, ... (a plain table or array)."""
    if values.ndim != 2 or values.shape[1] % 2:
        raise DataError(f"{path}: plain labels need an even number of columns (x, y per keypoint), "
                        f"got shape {values.shape}")
    n = values.shape[1] // 2
    names = [header[2 * k].strip().removesuffix("_x").removesuffix(".x") for k in range(n)] if header \
        else [f"point{k}" for k in range(n)]
    return Pose(values.reshape(len(values), n, 2), names)
