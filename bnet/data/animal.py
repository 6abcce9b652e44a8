"""Animal-centred windows without pose, egocentric alignment, and foreground masks.

``bnet data build --track-animal --window PX`` finds a freely moving animal (a mouse in an
open field seen from above, flies in an arena) by background subtraction, as ctrax or
idtracker do, so that each frame can show a square window around it without a pose model:

1. the video's first view is decoded once, in gray, at a reduced *tracking* resolution
   (longest side at most :data:`TRACKING_SIDE` px, area-averaged by ffmpeg); the reduced
   frames stay in memory when they fit :data:`TRACKING_MEMORY_BYTES` (else only the sampled
   ones do, and a second reduced pass finds the animal);
2. the background is the per-pixel median of :data:`BACKGROUND_FRAMES` frames sampled evenly
   over the whole video (a moving animal is elsewhere in most of them);
3. the foreground of a frame is its absolute difference to the background (the animal may
   be darker or lighter than the floor), Gaussian-smoothed by one tracking pixel, kept by a
   hysteresis threshold: pixels above ``high`` (Otsu's threshold over the sampled frames'
   differences) seed blobs that grow through pixels above ``low``; both have a floor above
   the sensor noise (:data:`MIN_CONTRAST` grey levels, or more where the video is noisier),
   so a frame without the animal has no foreground;
4. a small morphological opening, then the largest connected component is the animal, with
   the smaller blobs that come within a fraction of its size (an animal whose fur matches
   the floor falls apart into its brighter parts); from the second frame on, of the blobs at
   least half the largest one's area, the one nearest to the animal in the frame before (two
   flies of about one size: the track keeps to one rather than jumping to whichever looks
   larger); its centroid, weighted by the difference, is the animal's position;
5. frames without a blob take positions interpolated between their found neighbours (the
   nearest found one at the ends), and the track is smoothed over time (a median of up to 5
   frames, then a Gaussian of ``--track-smooth`` frames).

:class:`Windows` cuts each frame's window around the track (or a pose keypoint), rotated
about its centre for ``--align HEAD,TAIL`` so that the body axis points up, and maps the
labels and the foreground masks the same way.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from bnet.errors import DataError

TRACKING_SIDE = 256
"""The longest side of the frames the animal is found in (source frames larger than this are
area-averaged down; centroids are mapped back to source pixels)."""

TRACKING_MEMORY_BYTES = 256 * 2**20
"""Reduced frames kept in memory between the background model and the search for the animal
(the 3000-frame 1024x1024 fly video takes 188 MiB at 256x256); a longer video keeps only the
background's sample and decodes a second time."""

BACKGROUND_FRAMES = 100
"""Frames sampled evenly over the video for the per-pixel median background."""

MIN_CONTRAST = 8.0
"""Grey levels (of 255): a smoothed difference to the background below this is never the
animal, whatever Otsu's threshold says (it would split sensor noise in a video without one)."""

MIN_BLOB_AREA = 4
"""Tracking pixels: a smaller blob (after the opening) is not an animal."""

DEFAULT_TRACK_SMOOTH = 2.0
"""``--track-smooth``: the Gaussian's sigma in source frames (80 ms at 25 fps)."""

GROUP_REACH = 0.15
"""Blobs within this fraction of the largest blob's equivalent diameter (at least 2 tracking
pixels) belong to the same animal."""


@dataclass
class AnimalTrack:
    """Where the animal is in every frame of a video.

    Attributes:
        video: the video it was found in.
        centres: ``(frames, 2)`` smoothed positions (x, y) in source pixels, continuous
            coordinates (pixel ``i`` spans ``[i, i + 1)``).
        found: ``(frames,)`` whether a blob was found in the frame (else interpolated).
        raw: ``(frames, 2)`` the centroids found, NaN where none was.
        background: ``(h, w)`` float32 median background at tracking resolution.
        scale: source pixels per tracking pixel, (x, y).
        thresholds: the hysteresis thresholds (low, high), in grey levels.
        blobs: per frame, the animal's pixels at tracking resolution as ``(row0, col0,
            bool array)``, or None where none was found (kept for masks only).
        n_background_frames: frames in the background's median.
        n_passes: reduced decodes of the video (1, or 2 when the frames did not fit in memory).
    """

    video: Path
    centres: np.ndarray
    found: np.ndarray
    raw: np.ndarray
    background: np.ndarray
    scale: tuple[float, float]
    thresholds: tuple[float, float]
    blobs: list | None = None
    n_background_frames: int = 0
    n_passes: int = 1

    @property
    def n_frames(self) -> int:
        return len(self.centres)


# ---------------------------------------------------------------- reduced frames


def tracking_size(source: tuple[int, int], longest: int = TRACKING_SIDE) -> tuple[int, int]:
    """``(width, height)`` of the tracking frames: the source's aspect, longest side at most
    ``longest``."""
    factor = max(1.0, max(source) / longest)
    return max(1, round(source[0] / factor)), max(1, round(source[1] / factor))


def reduced_frames(path: Path, size: tuple[int, int], source: tuple[int, int],
                   limit: int | None = None) -> Iterator[np.ndarray]:
    """The video's frames in gray at ``size`` (area-averaged by ffmpeg), ``(h, w)`` uint8, one
    at a time, up to ``limit``."""
    import imageio_ffmpeg

    width, height = size
    params = [] if tuple(size) == tuple(source) else ["-vf", f"scale={width}:{height}:flags=area"]
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="gray", bpp=1, output_params=params)
    log = logging.getLogger("imageio_ffmpeg")
    level = log.level
    try:
        log.setLevel(logging.ERROR)  # it warns that the frames are smaller than the source: asked for
        try:
            meta = next(reader)
        finally:
            log.setLevel(level)
        if tuple(meta["size"]) != (width, height):
            raise DataError(f"{path}: ffmpeg gave {meta['size'][0]}x{meta['size'][1]} frames for the tracking "
                            f"resolution {width}x{height}")
        for k, raw in enumerate(reader):
            if limit is not None and k == limit:
                return
            yield np.frombuffer(raw, np.uint8).reshape(height, width)
    except (RuntimeError, OSError, StopIteration) as err:
        raise DataError(f"{path}: the video cannot be decoded for tracking ({err}): truncated or corrupt") from None
    finally:
        reader.close()


def evenly(n_frames: int, n: int = BACKGROUND_FRAMES) -> np.ndarray:
    """Up to ``n`` frame indices spread evenly over ``n_frames`` (first and last included)."""
    return np.unique(np.linspace(0, max(n_frames - 1, 0), min(n, max(n_frames, 1))).round().astype(int))


# ---------------------------------------------------------------- foreground


def differences(frames: np.ndarray, background: np.ndarray) -> np.ndarray:
    """``|frame - background|`` smoothed by a Gaussian of one pixel, float32; ``frames`` is
    ``(h, w)`` or ``(n, h, w)``."""
    from skimage.filters import gaussian

    diff = np.abs(frames.astype(np.float32) - background)
    sigma = (0.0,) * (diff.ndim - 2) + (1.0, 1.0)
    return gaussian(diff, sigma=sigma, preserve_range=True).astype(np.float32, copy=False)


def thresholds(sample_differences: np.ndarray) -> tuple[float, float]:
    """``(low, high)`` hysteresis thresholds from the sampled frames' differences: ``high`` is
    Otsu's threshold, ``low`` a third of it; both at least a floor above the noise (the
    differences' median plus 8 robust standard deviations, and :data:`MIN_CONTRAST`)."""
    from skimage.filters import threshold_otsu

    values = sample_differences.ravel()
    median = float(np.median(values))
    spread = 1.4826 * float(np.median(np.abs(values - median)))
    floor = max(MIN_CONTRAST, median + 8 * spread)
    otsu = float(threshold_otsu(values)) if values.max() > values.min() else 0.0
    high = max(otsu, 2 * floor)
    return max(floor, high / 3), high


def animal_blob(difference: np.ndarray, low: float, high: float, near: tuple[float, float] | None = None,
                previous: tuple[float, float] | None = None):
    """The animal in one frame's smoothed difference: ``(x, y, blob)`` (centroid in tracking
    pixels, continuous coordinates; ``blob`` = ``(row0, col0, bool array)``), or None.

    The largest blob after a small opening, with the blobs that come within
    :data:`GROUP_REACH` of its size. Given ``near`` (x, y, a pose keypoint), the blob there or
    the nearest one instead; given ``previous`` (x, y, the animal in the frame before), the
    blob nearest to it among those at least half the largest one's area, so that the track
    keeps to one of several similar animals rather than jumping to whichever looks largest."""
    from skimage.filters import apply_hysteresis_threshold
    from skimage.measure import label, regionprops
    from skimage.morphology import dilation, disk, opening

    if difference.max() <= high:
        return None
    kept = apply_hysteresis_threshold(difference, low, high)
    # the rest works on the box around what the threshold kept (2 px margin: the opening
    # sees the same zeros around it as in the whole frame)
    rows, cols = np.flatnonzero(kept.any(axis=1)), np.flatnonzero(kept.any(axis=0))
    top, left = max(0, rows[0] - 2), max(0, cols[0] - 2)
    labels = label(opening(kept[top : rows[-1] + 3, left : cols[-1] + 3], disk(1)))
    regions = [r for r in regionprops(labels) if r.area >= MIN_BLOB_AREA]
    if not regions:
        return None

    def distance(region, point):  # point: (x, y) in the frame's continuous coordinates
        return math.hypot(region.centroid[1] + left + 0.5 - point[0], region.centroid[0] + top + 0.5 - point[1])

    largest = max(regions, key=lambda r: r.area)
    if near is None:
        main = largest
        if previous is not None:
            similar = [r for r in regions if r.area >= largest.area / 2]
            main = min(similar, key=lambda r: distance(r, previous))
    else:
        row, col = int(near[1]) - top, int(near[0]) - left
        inside = labels[row, col] if 0 <= row < labels.shape[0] and 0 <= col < labels.shape[1] else 0
        by_label = {r.label: r for r in regions}
        main = by_label.get(inside) or min(regions, key=lambda r: distance(r, near))
    reach = max(2, math.ceil(GROUP_REACH * main.equivalent_diameter_area))
    r0, c0, r1, c1 = main.bbox
    r0, c0 = max(0, r0 - reach), max(0, c0 - reach)
    r1, c1 = min(labels.shape[0], r1 + reach), min(labels.shape[1], c1 + reach)
    local = labels[r0:r1, c0:c1]
    near_labels = set(np.unique(local[dilation(local == main.label, disk(reach))]).tolist()) - {0}
    group = [r.label for r in regions if r.label in near_labels]
    keep = np.isin(labels, group)
    rows, cols = np.nonzero(keep)
    weights = difference[rows + top, cols + left].astype(np.float64)
    x = float((cols * weights).sum() / weights.sum()) + left + 0.5
    y = float((rows * weights).sum() / weights.sum()) + top + 0.5
    br0, bc0 = rows.min(), cols.min()
    return x, y, (int(br0 + top), int(bc0 + left), keep[br0 : rows.max() + 1, bc0 : cols.max() + 1].copy())


# ---------------------------------------------------------------- the track


def held_positions(positions: np.ndarray) -> np.ndarray:
    """``(frames, 2)`` positions with each NaN frame holding the last found position (the
    first found one before any was found)."""
    positions = np.array(positions, dtype=np.float64)
    found = np.isfinite(positions).all(axis=1)
    if not found.any():
        raise DataError("the keypoint to centre on is never found")
    last = np.maximum.accumulate(np.where(found, np.arange(len(found)), -1))
    last[last < 0] = np.argmax(found)
    return positions[last]




def fill_gaps(raw: np.ndarray, found: np.ndarray) -> np.ndarray:
    """``(frames, d)`` values with the unfound frames interpolated between found neighbours
    (held at the ends)."""
    t = np.arange(len(raw))
    return np.stack([np.interp(t, t[found], raw[found, d]) for d in range(raw.shape[1])], axis=1)


def smooth_over_time(values: np.ndarray, frames: float) -> np.ndarray:
    """``(frames, d)`` values smoothed along time: a running median of up to 5 frames (single
    glitches go) then a Gaussian of sigma ``frames``; the ends are padded by point reflection,
    so a steady drift is kept to the last frame. ``frames`` 0 returns them as they are."""
    from scipy.ndimage import gaussian_filter1d, median_filter

    values = np.asarray(values, dtype=np.float64)
    if frames <= 0 or len(values) < 3:
        return values
    size = min(5, 2 * math.ceil(frames) + 1)
    pad = size + math.ceil(4 * frames)
    padded = np.pad(values, ((pad, pad), (0, 0)), mode="reflect", reflect_type="odd")
    smoothed = gaussian_filter1d(median_filter(padded, size=(size, 1), mode="nearest"), frames, axis=0,
                                 mode="nearest")
    return smoothed[pad : pad + len(values)]


def track_animal(video: Path, source: tuple[int, int], *, estimate: int | None = None, limit: int | None = None,
                 smooth: float = DEFAULT_TRACK_SMOOTH, near: np.ndarray | None = None, keep_blobs: bool = False,
                 echo: Callable[[str], None] | None = None, memory: int = TRACKING_MEMORY_BYTES) -> AnimalTrack:
    """Find the animal in every frame of ``video`` (``source`` = its (width, height)); see the
    module doc.

    Args:
        estimate: the video's frames, as its duration x frame rate say (decides whether the
            reduced frames fit in ``memory``).
        limit: use the first this many frames only (``--max-frames``).
        smooth: ``--track-smooth``, the Gaussian's sigma in frames (0: no smoothing).
        near: ``(frames, 2)`` source positions (a pose keypoint, ``--centre-on``): each frame's
            animal is the blob there or nearest to it, not the largest.
        keep_blobs: keep each frame's blob (for masks).

    Raises:
        DataError: naming the video, where it cannot be decoded or the animal is never found.
    """
    from bnet.progress import Progress

    size = tracking_size(source)
    scale = (source[0] / size[0], source[1] / size[1])
    expected = min(n for n in (estimate, limit) if n is not None) if (estimate or limit) else None
    in_memory = expected is not None and expected * size[0] * size[1] <= memory
    progress = Progress(expected, f"  {video.name}: frames tracked", echo or (lambda _: None), unit="frame")
    try:
        if in_memory:
            kept = list(reduced_frames(video, size, source, limit))
            if not kept:
                raise DataError(f"{video}: no frames to track the animal in")
            sample = np.stack([kept[i] for i in evenly(len(kept))])
            frames: object = kept
            n_passes = 1
        else:
            # every step-th frame, the step doubling whenever that keeps too many: evenly spread
            # over the whole video, whatever its length
            reservoir, step = [], 1
            for k, frame in enumerate(reduced_frames(video, size, source, limit)):
                if k % step == 0:
                    reservoir.append(frame)
                    if len(reservoir) > 2 * BACKGROUND_FRAMES:
                        reservoir, step = reservoir[::2], 2 * step
            if not reservoir:
                raise DataError(f"{video}: no frames to track the animal in")
            sample = np.stack([reservoir[i] for i in evenly(len(reservoir))])
            del reservoir
            frames = reduced_frames(video, size, source, limit)
            n_passes = 2
        background = np.median(sample, axis=0).astype(np.float32)
        low, high = thresholds(differences(sample, background))
        del sample
        near_tracking = None if near is None else np.asarray(near, dtype=np.float64) / np.array(scale)
        raw, found, blobs = [], [], []
        chunk: list[np.ndarray] = []

        def flush():
            for frame_diff in differences(np.stack(chunk), background):
                k = len(raw)
                point = None
                if near_tracking is not None:
                    point = near_tracking[min(k, len(near_tracking) - 1)]
                    point = tuple(point) if np.isfinite(point).all() else None
                before = raw[-1] if raw and found[-1] else None
                hit = animal_blob(frame_diff, low, high, point,
                                  None if before is None else (before[0] / scale[0], before[1] / scale[1]))
                raw.append((np.nan, np.nan) if hit is None else (hit[0] * scale[0], hit[1] * scale[1]))
                found.append(hit is not None)
                if keep_blobs:
                    blobs.append(None if hit is None else hit[2])
            progress.update(len(chunk))
            chunk.clear()

        for frame in frames:
            chunk.append(frame)
            if len(chunk) == 64:
                flush()
        if chunk:
            flush()
    finally:
        progress.close()
    raw_xy, found_mask = np.array(raw, dtype=np.float64).reshape(-1, 2), np.array(found, dtype=bool)
    if not found_mask.any():
        raise DataError(f"{video}: the animal is never found: no frame differs from the background (the median "
                        f"of {len(evenly(len(raw_xy)))} frames sampled over the video) by more than {high:.0f} grey "
                        f"levels; an animal that hardly moves is part of that background: centre on a pose "
                        f"keypoint with --centre-on instead")
    centres = smooth_over_time(fill_gaps(raw_xy, found_mask), smooth)
    return AnimalTrack(video, centres, found_mask, raw_xy, background, scale, (low, high),
                       blobs if keep_blobs else None, len(evenly(len(raw_xy))), n_passes)


# ---------------------------------------------------------------- alignment


def body_rotation(xy: np.ndarray, names: list[str], head: str, tail: str, smooth: float, source: str) -> np.ndarray:
    """Per frame, the rotation (degrees counter-clockwise on screen, PIL's ``Image.rotate``)
    that turns the body axis TAIL -> HEAD to point up (towards y = 0): from the pose ``xy``
    ``(frames, keypoints, 2)``; where either keypoint is missing the last known angle holds
    (the first known one before it); unwrapped and smoothed like the track."""
    missing = [n for n in (head, tail) if n not in names]
    if missing:
        raise DataError(f"{source}: --align names no keypoint(s) {', '.join(missing)} (has {', '.join(names)})")
    axis = xy[:, names.index(head)].astype(np.float64) - xy[:, names.index(tail)]
    axis[np.hypot(axis[:, 0], axis[:, 1]) == 0] = np.nan  # head on tail: no direction
    if not np.isfinite(axis).all(axis=1).any():
        raise DataError(f"{source}: --align {head},{tail}: the two keypoints are never both found")
    axis = held_positions(axis)
    heading = smooth_over_time(np.unwrap(np.arctan2(-axis[:, 1], axis[:, 0]))[:, None], smooth)[:, 0]
    rotation = 90.0 - np.degrees(heading)
    return (rotation + 180.0) % 360.0 - 180.0


# ---------------------------------------------------------------- windows


@dataclass
class Windows:
    """The square window each frame shows: its centre in source pixels and, aligned, the
    rotation about that centre. Per source frame; a frame past the end takes the last one.

    Attributes:
        centres: ``(frames, 2)`` window centres (x, y), source pixels, continuous coordinates.
        side: the window's side in source pixels.
        rotation: ``(frames,)`` degrees counter-clockwise (PIL's ``Image.rotate``), or None
            (not aligned: the window is cut at whole pixels, no resampling).
        method: ``track-animal`` or ``centre-on:KEYPOINT``.
    """

    centres: np.ndarray
    side: int
    rotation: np.ndarray | None = None
    method: str = ""
    origins: np.ndarray = field(init=False, repr=False)

    @classmethod
    def around(cls, positions: np.ndarray, side: int, rotation: np.ndarray | None = None,
               method: str = "") -> "Windows":
        """Windows around ``positions``; unrotated ones start at whole pixels
        (``round(position) - side // 2``), rotated ones are centred on the position itself."""
        positions = np.asarray(positions, dtype=np.float64)
        if rotation is None:
            centres = np.rint(positions) - side // 2 + side / 2
        else:
            centres = positions
        return cls(centres, side, None if rotation is None else np.asarray(rotation, np.float64), method)

    def __post_init__(self):
        self.origins = np.rint(self.centres - self.side / 2).astype(int)

    def centre(self, i: int) -> np.ndarray:
        """Frame ``i``'s window centre (x, y), source pixels."""
        return self.centres[min(i, len(self.centres) - 1)]

    def _angle(self, i: int) -> float:
        return 0.0 if self.rotation is None else float(self.rotation[min(i, len(self.rotation) - 1)])

    def affine(self, i: int) -> tuple[float, ...]:
        """PIL's affine ``data``: window pixel (u, v) -> source pixel, for frame ``i``."""
        (cx, cy), half = self.centre(i), self.side / 2
        beta = math.radians(self._angle(i))
        cos, sin = math.cos(beta), math.sin(beta)
        return cos, -sin, cx - cos * half + sin * half, sin, cos, cy - sin * half - cos * half

    def cut(self, image, i: int):
        """Frame ``i``'s window of a PIL image (black outside the frame)."""
        from PIL import Image

        if self.rotation is None:
            x, y = self.origins[min(i, len(self.origins) - 1)]
            return image.crop((x, y, x + self.side, y + self.side))
        return image.transform((self.side, self.side), Image.Transform.AFFINE, self.affine(i),
                               resample=Image.Resampling.BILINEAR, fillcolor=0)

    def points(self, xy: np.ndarray) -> np.ndarray:
        """``(frames, keypoints, 2)`` source positions -> window positions, frame by frame."""
        n = len(xy)
        index = np.arange(n)
        centres = self.centres[np.minimum(index, len(self.centres) - 1)][:, None, :]
        relative = xy.astype(np.float64) - centres
        if self.rotation is None:
            out = relative
        else:
            beta = np.radians(self.rotation[np.minimum(index, len(self.rotation) - 1)])[:, None]
            cos, sin = np.cos(beta), np.sin(beta)
            out = np.stack([cos * relative[..., 0] + sin * relative[..., 1],
                            -sin * relative[..., 0] + cos * relative[..., 1]], axis=-1)
        return (out + self.side / 2).astype(np.float32)

    def rows(self, indices) -> np.ndarray:
        """``(len(indices), 3)`` float32: window centre x, y (source pixels) and rotation."""
        return np.array([(*self.centre(i), self._angle(i)) for i in indices], dtype=np.float32)

    def corners(self, i: int) -> np.ndarray:
        """The window's four corners in source pixels (for figures)."""
        a, b, c, d, e, f = self.affine(i)
        s = self.side
        return np.array([(a * u + b * v + c, d * u + e * v + f) for u, v in ((0, 0), (s, 0), (s, s), (0, s))])

    def mask(self, blob, i: int, scale: tuple[float, float], geometry, weight: float, channels: int) -> np.ndarray:
        """``(channels, Y, X)`` float32 output weights for frame ``i``: 1 on the animal's blob
        (cut, rotated and resized exactly like the frame, then grown by one output pixel),
        ``weight`` elsewhere; 1 everywhere where no blob was found (nothing is down-weighted
        where the animal is not known)."""
        from PIL import Image
        from skimage.morphology import dilation, disk

        width, height = geometry.out_size
        if blob is None:
            return np.ones((channels, height, width), np.float32)
        row0, col0, pixels = blob
        a, b, c, d, e, f = self.affine(i)
        sx, sy = scale
        data = (a / sx, b / sx, c / sx - col0, d / sy, e / sy, f / sy - row0)
        image = Image.fromarray(pixels.astype(np.uint8) * 255)
        cut = image.transform((self.side, self.side), Image.Transform.AFFINE, data,
                              resample=Image.Resampling.BILINEAR, fillcolor=0)
        on = dilation(geometry.frame(cut)[0] >= 128, disk(1))
        weights = np.where(on, 1.0, weight).astype(np.float32)
        return np.broadcast_to(weights, (channels, height, width))
