"""Sessions from video files and pose-estimation output.

Frames are decoded and resized by ffmpeg (the binary imageio-ffmpeg ships, or the one on
the PATH) and streamed: the video is never held in memory at full resolution, only the
resized frames of the session being written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from bnet.data.session import trial_name
from bnet.errors import DataError


def read_video(path: str | Path, y_pixels: int, x_pixels: int, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Grayscale frames (y_pixels, x_pixels) uint8 of a video, resized by ffmpeg (area averaging)."""
    import imageio_ffmpeg

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such video file")
    frames = imageio_ffmpeg.read_frames(
        str(path), pix_fmt="gray", bpp=1,
        output_params=["-vf", f"scale={x_pixels}:{y_pixels}:flags=area", *(["-frames:v", str(max_frames)]
                                                                           if max_frames else [])])
    try:
        next(frames)  # the metadata
        for raw in frames:
            yield np.frombuffer(raw, dtype=np.uint8).reshape(y_pixels, x_pixels)
    except (RuntimeError, OSError) as err:
        raise DataError(f"{path}: cannot be decoded as video ({str(err).splitlines()[0]})") from None
    finally:
        frames.close()


def sleap_labels(path: str | Path, track: int = 0, nodes: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """One track of a SLEAP analysis file as (frames, 2 * nodes) labels, all x then all y
    (BehaveNet's label order), NaN where the node was not found; and the label names."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            tracks = f["tracks"][()]  # (tracks, xy, nodes, frames) as SLEAP stores it
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["node_names"][()]]
    except (OSError, KeyError) as err:
        raise DataError(f"{path}: not a SLEAP analysis file (needs datasets tracks, node_names): {err}") from None
    if not 0 <= track < tracks.shape[0]:
        raise DataError(f"{path}: has {tracks.shape[0]} tracks, no track {track}")
    chosen = list(range(len(names))) if nodes is None else [names.index(n) for n in nodes if n in names]
    if nodes is not None and len(chosen) != len(nodes):
        missing = [n for n in nodes if n not in names]
        raise DataError(f"{path}: no node(s) {', '.join(missing)} (has {', '.join(names)})")
    xy = tracks[track][:, chosen, :]  # (2, nodes, frames)
    labels = np.concatenate([xy[0].T, xy[1].T], axis=1).astype(np.float32)
    label_names = [f"{names[i]}_x" for i in chosen] + [f"{names[i]}_y" for i in chosen]
    return labels, label_names


def held_positions(positions: np.ndarray) -> np.ndarray:
    """``(frames, 2)`` positions with each NaN frame holding the last found position (the
    first found one before any was found)."""
    positions = np.array(positions, dtype=np.float64)
    found = np.isfinite(positions).all(axis=1)
    if not found.any():
        raise DataError("the tracked node is never found: there is no position to centre crops on")
    last = np.maximum.accumulate(np.where(found, np.arange(len(found)), -1))
    last[last < 0] = np.argmax(found)
    return positions[last]


def centred_crops(frames: Iterator[np.ndarray], centres: np.ndarray, crop: int, size: int) -> Iterator[np.ndarray]:
    """Square ``crop``-pixel windows of each frame around its ``(x, y)`` centre (zeros beyond
    the frame), area-averaged to ``size`` pixels: an animal-centred (egocentric) view of a
    freely moving animal, which is only a few pixels long in the downsampled whole frame."""
    if crop % size:
        raise DataError(f"crop {crop} px is not a whole multiple of the output size {size} px")
    factor, half = crop // size, crop // 2
    for frame, (x, y) in zip(frames, np.rint(centres).astype(int)):
        padded = np.pad(frame, half)
        window = padded[y : y + crop, x : x + crop].astype(np.float32)
        yield window.reshape(size, factor, size, factor).mean(axis=(1, 3)).round().astype(np.uint8)


def centred_labels(labels: np.ndarray, centres: np.ndarray, crop: int, size: int) -> np.ndarray:
    """Labels (all x then all y, as :func:`sleap_labels`) in the pixels of :func:`centred_crops`."""
    n = labels.shape[1] // 2
    origin = np.rint(centres) - crop // 2
    shifted = np.concatenate([labels[:, :n] - origin[:, :1], labels[:, n:] - origin[:, 1:]], axis=1)
    return (shifted * size / crop).astype(np.float32)


def write_session(path: str | Path, frames: Iterator[np.ndarray], trial_length: int,
                  labels: np.ndarray | None = None, attrs: dict | None = None) -> int:
    """Write frames (and their labels, NaN masked in ``labels_masks``) as a session of trials
    of ``trial_length`` frames; a last partial trial is dropped. Returns the trials written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_trials, buffer = 0, []
    with h5py.File(path, "w") as f:
        f.attrs.update(attrs or {})
        groups = {name: f.create_group(name) for name in ("images", *(("labels", "labels_masks")
                                                                      if labels is not None else ()))}
        for frame in frames:
            buffer.append(frame)
            if len(buffer) < trial_length:
                continue
            start = n_trials * trial_length
            name = trial_name(n_trials)
            groups["images"].create_dataset(name, data=np.stack(buffer)[:, None], chunks=True)
            if labels is not None:
                if start + trial_length > len(labels):
                    raise DataError(f"{path}: the video has more frames than the {len(labels)} labels")
                chunk = labels[start : start + trial_length]
                groups["labels"].create_dataset(name, data=np.nan_to_num(chunk))
                groups["labels_masks"].create_dataset(name, data=np.isfinite(chunk).astype(np.float32))
            n_trials, buffer = n_trials + 1, []
    return n_trials
