"""Sessions from a lab's raw data: videos (or labelled stills), pose labels, neural activity.

:func:`build_session` is ``bnet data build``: frames are decoded by ffmpeg and streamed one
at a time (the video is never held in memory), cropped and resized by one
:class:`FrameGeometry` that maps the labels the same way, resampled to a common frame rate,
cut into trials and written to a temporary file that replaces the output only when every
check has passed, so a failed build leaves nothing behind.

Freely moving animals get animal-centred windows (:mod:`bnet.data.animal`): around a pose
keypoint (``--centre-on``) or around the animal found by background subtraction, without pose
(``--track-animal``), optionally rotated so that the body axis points up (``--align``), with
the foreground as BehaveNet's ``masks`` (``--masks``); every centred build writes where its
windows were (group ``animal_track``) and a figure of the track (``OUT.track.png``).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np

from bnet.data.animal import DEFAULT_TRACK_SMOOTH, held_positions
from bnet.data.pose import flat_labels, read_pose
from bnet.data.session import trial_name
from bnet.errors import ConfigError, DataError
from bnet.progress import Echo, Progress, say

FIT_MODES = ("pad", "crop", "stretch")

TOLERATED_EXTRA_FRAMES = 2
"""Trailing label (or neural) rows past the video's last decoded frame that a build drops by
itself, saying so and recording it in the file. A pose tracker and ffmpeg often disagree by a
frame or two about where a video ends (the tracker's reader counts a last frame that ffmpeg
does not decode), so such an overrun is routine, not a sign of the wrong file; a longer one
is refused unless ``--trim-extra-frames`` allows it, and a table shorter than the video is
always refused: the rows are matched to frames from the first, so neither hides a shift."""


@dataclass
class BuildConfig:
    """What ``bnet data build`` makes.

    Attributes:
        out: the session file (a folder gets ``data.hdf5`` inside, BehaveNet's
            ``data_dir/lab/expt/animal/session/data.hdf5``).
        videos: one video per camera view, stacked as channels (same size and length).
            Empty: the frames are the stills a label table names.
        labels: pose labels (DeepLabCut/lightning-pose CSV or H5, SLEAP analysis HDF5,
            plain CSV/NPY), one row per source frame.
        label_format: the format, where detection from the file is not wanted.
        min_likelihood: keypoints below this likelihood are missing (masked).
        keypoints: the keypoints to keep as labels (names as the label file gives them,
            ``track0_head`` for SLEAP's tracks); None keeps all.
        neural: neural activity, frames x neurons (NPY, MAT or HDF5).
        neural_key: the variable (MAT) or dataset (HDF5) holding it, if not the only 2-D one.
        neural_fps: its sampling rate; None: one row per source video frame.
        y_pixels, x_pixels: frame size written.
        crop: ``(x, y, width, height)`` of the source frame to keep; None: all of it.
        centre_on: a keypoint of the labels (e.g. ``track0_thorax``): every frame is a square
            ``window`` around it (an animal-centred view of a freely moving animal, which is
            a few pixels long in the downsampled whole frame), its labels moved with it.
            Where the keypoint is missing the last found position holds.
        track_animal: centre the ``window`` on the animal found without pose, by background
            subtraction in the (first) video: the largest blob that differs from the median
            of frames sampled over the video, its smoothed centroid (see
            :mod:`bnet.data.animal`); exclusive with ``centre_on``.
        window: the side of that square, in source pixels.
        track_smooth: the Gaussian's sigma, in source frames, that smooths the tracked centre
            (after a running median of up to 5 frames) and the ``align`` angle; 0: none.
        align: ``(HEAD, TAIL)`` keypoints of the labels: each window is rotated about its
            centre so that the body axis TAIL -> HEAD points up (egocentric, as VAME and
            keypoint-moseq align), labels rotated with it; where either keypoint is missing
            the last known angle holds. Needs ``labels`` and a centred window.
        masks: write BehaveNet's ``masks`` group (as ``images``, float32): 1 on the animal's
            foreground blob (cut, rotated and resized like the frame, grown by one output
            pixel), ``mask_background_weight`` elsewhere; the data config then says
            ``use_output_mask``. Needs a centred window of one video.
        mask_background_weight: the weight of the pixels off the animal (0 leaves them
            unconstrained; the masked loss divides by the mask's sum, so weights are relative).
        fit: how the (cropped) frame meets the output size: ``pad`` keeps the aspect and
            pads, ``crop`` keeps the aspect and crops the excess, ``stretch`` does neither.
        color: ``gray`` (one channel per view) or ``rgb`` (three).
        trial_length: frames per trial (a last partial trial is dropped, and said so).
        fps: resample to this frame rate (nearest frame; neural counts summed per frame,
            other neural signals averaged); None keeps the video's.
        max_frames: build from the first this many source frames only (and as many label and
            neural rows).
        trim_extra_frames: label and neural rows that run on past the video's last frame by at
            most this many frames are dropped (said, and recorded in the file's attributes
            ``labels_rows_trimmed`` and ``neural_rows_trimmed``); more is an error.
        overwrite: replace an existing output.
    """

    out: Path
    videos: list[Path] = field(default_factory=list)
    labels: Path | None = None
    label_format: str | None = None
    min_likelihood: float | None = None
    keypoints: list[str] | None = None
    neural: Path | None = None
    neural_key: str | None = None
    neural_fps: float | None = None
    y_pixels: int = 128
    x_pixels: int = 128
    crop: tuple[int, int, int, int] | None = None
    centre_on: str | None = None
    track_animal: bool = False
    window: int | None = None
    track_smooth: float = DEFAULT_TRACK_SMOOTH
    align: tuple[str, str] | None = None
    masks: bool = False
    mask_background_weight: float = 0.1
    max_frames: int | None = None
    trim_extra_frames: int = TOLERATED_EXTRA_FRAMES
    fit: str = "pad"
    color: str = "gray"
    trial_length: int = 100
    fps: float | None = None
    overwrite: bool = False

    def validate(self) -> None:
        if self.fit not in FIT_MODES:
            raise ConfigError(f"--fit must be one of {', '.join(FIT_MODES)}, got '{self.fit}'")
        if self.color not in ("gray", "rgb"):
            raise ConfigError(f"--color must be gray or rgb, got '{self.color}'")
        for name, value in (("--y-pixels", self.y_pixels), ("--x-pixels", self.x_pixels),
                            ("--trial-length", self.trial_length)):
            if value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        for name, value in (("--fps", self.fps), ("--neural-fps", self.neural_fps)):
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.crop is not None and (len(self.crop) != 4 or min(self.crop[2:]) < 1 or min(self.crop[:2]) < 0):
            raise ConfigError(f"--crop is X,Y,WIDTH,HEIGHT with a positive size, got {self.crop}")
        if self.track_animal and self.centre_on is not None:
            raise ConfigError("--track-animal and --centre-on are two ways to centre the window: give one "
                              "(--centre-on KEYPOINT follows a pose keypoint, --track-animal needs no pose)")
        if self.track_animal and self.window is None:
            raise ConfigError("--track-animal needs --window PX: the side of the square around the animal, in "
                              "source pixels")
        if self.track_animal and not self.videos:
            raise ConfigError("--track-animal finds the animal in a video: give --video")
        if self.track_animal and (self.crop is not None or self.window < 2):
            raise ConfigError("--track-animal needs a --window of at least 2 px, and replaces --crop")
        if (self.centre_on is None) != (self.window is None) and not self.track_animal:
            raise ConfigError("--centre-on and --window go together (a keypoint, and the square's side in px), "
                              "or --track-animal and --window")
        if self.centre_on is not None and (self.crop is not None or self.labels is None or self.window < 2):
            raise ConfigError("--centre-on needs --labels and a --window of at least 2 px, and replaces --crop")
        if self.track_smooth < 0:
            raise ConfigError(f"--track-smooth must be at least 0 frames (0: no smoothing), got {self.track_smooth}")
        centred = self.track_animal or self.centre_on is not None
        if self.align is not None:
            if len(self.align) != 2 or not all(self.align) or self.align[0] == self.align[1]:
                raise ConfigError(f"--align is HEAD,TAIL: two different keypoints, got {','.join(self.align)}")
            if self.labels is None:
                raise ConfigError("--align HEAD,TAIL turns the body axis from pose keypoints up: it needs --labels")
            if not centred:
                raise ConfigError("--align rotates an animal-centred window: give --centre-on KEYPOINT or "
                                  "--track-animal, with --window")
        if self.masks:
            if not centred:
                raise ConfigError("--masks weights the animal in an animal-centred window: give --track-animal or "
                                  "--centre-on KEYPOINT, with --window")
            if len(self.videos) != 1:
                raise ConfigError("--masks finds the animal's foreground in one video: give one --video "
                                  f"(got {len(self.videos)})")
        if not 0 <= self.mask_background_weight <= 1:
            raise ConfigError(f"--mask-background-weight must be within 0..1 (the animal weighs 1), got "
                              f"{self.mask_background_weight}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ConfigError(f"--max-frames must be at least 1, got {self.max_frames}")
        if self.trim_extra_frames < 0:
            raise ConfigError(f"--trim-extra-frames must be at least 0, got {self.trim_extra_frames}")
        if not self.videos and self.labels is None:
            raise ConfigError("nothing to build: give --video (one per view), or --labels naming labelled stills")

    @property
    def session_path(self) -> Path:
        out = Path(self.out)
        return out / "data.hdf5" if out.is_dir() or not out.suffix else out


@dataclass(frozen=True)
class FrameGeometry:
    """Crop, resize and pad of source frames, and the same map for label coordinates.

    ``box`` is the region of the source frame (x0, y0, x1, y1) that is resized to
    ``(width, height)`` pixels and placed at ``offset`` in the output frame.
    """

    box: tuple[float, float, float, float]
    size: tuple[int, int]
    offset: tuple[int, int]
    out_size: tuple[int, int]

    @classmethod
    def plan(cls, source: tuple[int, int], out_size: tuple[int, int], crop=None, fit: str = "pad") -> "FrameGeometry":
        """``source`` and ``out_size`` are (width, height)."""
        x0, y0, w, h = crop if crop is not None else (0, 0, *source)
        if x0 + w > source[0] or y0 + h > source[1]:
            raise ConfigError(f"--crop {x0},{y0},{w},{h} reaches outside the {source[0]}x{source[1]} frame")
        width, height = out_size
        if fit == "stretch":
            return cls((x0, y0, x0 + w, y0 + h), out_size, (0, 0), out_size)
        if fit == "pad":
            scale = min(width / w, height / h)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            return cls((x0, y0, x0 + w, y0 + h), size, ((width - size[0]) // 2, (height - size[1]) // 2), out_size)
        scale = max(width / w, height / h)
        bw, bh = width / scale, height / scale
        bx, by = x0 + (w - bw) / 2, y0 + (h - bh) / 2
        return cls((bx, by, bx + bw, by + bh), out_size, (0, 0), out_size)

    def frame(self, image) -> np.ndarray:
        """A PIL image (mode L or RGB) -> ``(channels, height, width)`` uint8, area-averaged."""
        from PIL import Image

        resized = image.resize(self.size, Image.Resampling.BOX, box=self.box)
        if self.size != self.out_size:
            canvas = Image.new(image.mode, self.out_size)
            canvas.paste(resized, self.offset)
            resized = canvas
        array = np.asarray(resized)
        return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)

    def points(self, xy: np.ndarray) -> np.ndarray:
        """``(..., 2)`` source pixel coordinates -> output pixel coordinates."""
        x0, y0, x1, y1 = self.box
        scale = np.array([self.size[0] / (x1 - x0), self.size[1] / (y1 - y0)])
        return ((xy - np.array([x0, y0])) * scale + np.array(self.offset)).astype(np.float32)


@dataclass
class BuildSummary:
    """What a build wrote."""

    path: Path
    config_path: Path
    n_trials: int
    trial_length: int
    n_frames_source: int
    n_frames_dropped: int
    frame_shape: tuple[int, int, int]
    fps: float | None
    n_labels: int
    n_neurons: int
    seconds: float
    rows_trimmed: dict[str, int] = field(default_factory=dict)
    """Trailing rows dropped as past the video's end, per source (``labels``, ``neural``)."""
    centring: str | None = None
    """How the windows were centred (``track-animal``, ``centre-on:KEYPOINT``), or None."""
    window: int | None = None
    align: tuple[str, str] | None = None
    n_frames_tracked: int = 0
    """Frames the animal was looked for in (``--track-animal``, ``--masks``)."""
    n_frames_found: int = 0
    """Of those, the frames it was found in (the others interpolated)."""
    track_figure: Path | None = None
    masks: bool = False
    mask_background_weight: float | None = None


# ---------------------------------------------------------------- sources


def video_metadata(path: Path) -> dict:
    import imageio_ffmpeg

    if not path.is_file():
        raise DataError(f"{path}: no such video file")
    try:
        reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="gray", bpp=1)
        meta = next(reader)
        reader.close()
    except (RuntimeError, OSError, StopIteration) as err:
        raise DataError(f"{path}: cannot be read as video: truncated, corrupt or not a video "
                        f"(ffmpeg: {_first_line(err)})") from None
    return meta


def _first_line(err: Exception) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def decoded_frames(path: Path, color: str) -> Iterator:
    """The frames of a video as PIL images, one at a time, at full resolution."""
    import imageio_ffmpeg
    from PIL import Image

    fmt, bpp, mode = ("gray", 1, "L") if color == "gray" else ("rgb24", 3, "RGB")
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt=fmt, bpp=bpp)
    try:
        meta = next(reader)
        width, height = meta["size"]
        for raw in reader:
            yield Image.frombuffer(mode, (width, height), raw, "raw", mode, 0, 1)
    except (RuntimeError, OSError) as err:
        raise DataError(f"{path}: the video cannot be decoded past this point ({_first_line(err)}): "
                        f"truncated or corrupt") from None
    finally:
        reader.close()


def still_frames(paths: list[Path], color: str) -> Iterator:
    from PIL import Image, UnidentifiedImageError

    for path in paths:
        try:
            with Image.open(path) as image:
                yield image.convert("L" if color == "gray" else "RGB")
        except (OSError, UnidentifiedImageError) as err:
            raise DataError(f"{path}: cannot be read as an image ({err})") from None


def read_neural(path: Path, key: str | None) -> np.ndarray:
    """Frames x neurons from NPY, MAT (``key`` or the only 2-D variable) or HDF5."""
    if not path.is_file():
        raise DataError(f"{path}: no such neural data file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = np.load(path, allow_pickle=False)
    elif suffix == ".mat":
        import scipy.io

        try:
            content = {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
        except (ValueError, NotImplementedError, OSError) as err:
            raise DataError(f"{path}: cannot be read as a MATLAB file ({err})") from None
        array = _one_array(path, {k: v for k, v in content.items() if getattr(v, "ndim", 0) == 2}, key, "variable")
    elif suffix in (".h5", ".hdf5"):
        with h5py.File(path, "r") as f:
            found = {}
            f.visititems(lambda name, item: found.setdefault(name, item) if isinstance(item, h5py.Dataset)
                         and item.ndim == 2 else None)
            array = _one_array(path, found, key, "dataset")[()]
    else:
        raise DataError(f"{path}: unknown neural format '{suffix}' (known: .npy, .mat, .h5/.hdf5)")
    array = np.asarray(array)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise DataError(f"{path}: neural data must be a numeric frames x neurons array, got {array.dtype} "
                        f"{array.shape}")
    return array


def _one_array(path: Path, found: dict, key: str | None, what: str):
    if key is not None:
        if key not in found:
            raise DataError(f"{path}: no 2-D {what} '{key}' (has {', '.join(found) or 'none'})")
        return found[key]
    if len(found) != 1:
        raise DataError(f"{path}: {len(found)} 2-D {what}s ({', '.join(found) or 'none'}): name one with --neural-key")
    return next(iter(found.values()))


# ---------------------------------------------------------------- resampling


def source_index(k: int, source_fps: float, out_fps: float) -> int:
    """The source frame nearest to output frame ``k``'s time."""
    return int(math.floor(k * source_fps / out_fps + 0.5))


def resampled(frames: Iterator, source_fps: float | None, out_fps: float | None) -> Iterator[tuple[int, object]]:
    """``(source index, frame)`` per output frame: each output frame takes the nearest
    source frame (frames repeat when upsampling, are skipped when downsampling)."""
    if out_fps is None or source_fps is None or out_fps == source_fps:
        yield from enumerate(frames)
        return
    k = 0
    for i, frame in enumerate(frames):
        while source_index(k, source_fps, out_fps) == i:
            yield i, frame
            k += 1


def is_counts(neural: np.ndarray) -> bool:
    return bool(np.all(neural >= 0) and np.all(neural == np.round(neural)))


def neural_per_frame(neural: np.ndarray, neural_fps: float, out_fps: float, n_out: int) -> np.ndarray:
    """Neural rows binned into output frames: counts summed, other signals averaged."""
    counts = is_counts(neural)
    edges = np.floor(np.arange(n_out + 1) * neural_fps / out_fps + 0.5).astype(int)
    rows = np.empty((n_out, neural.shape[1]), dtype=np.float32)
    for k in range(n_out):
        chunk = neural[edges[k] : max(edges[k + 1], edges[k] + 1)]
        rows[k] = chunk.sum(axis=0) if counts else chunk.mean(axis=0)
    return rows


# ---------------------------------------------------------------- the build


def build_session(config: BuildConfig, echo: Echo = say) -> BuildSummary:
    """Build one session file (and its data config) from ``config``; see the module doc."""
    config.validate()
    started = time.perf_counter()
    out = config.session_path
    if out.exists() and not config.overwrite:
        raise DataError(f"{out}: exists (pass --overwrite to replace it)")
    pose = read_pose(config.labels, config.label_format, config.min_likelihood) if config.labels else None
    label_rows_in_file = 0 if pose is None else pose.n_frames
    if pose is not None and config.max_frames is not None:
        pose = pose.first(config.max_frames)
    videos = [Path(v) for v in config.videos]
    if videos:
        metas = [video_metadata(v) for v in videos]
        sizes = {tuple(m["size"]) for m in metas}
        if len(sizes) > 1:
            raise DataError("the views differ in size: " + ", ".join(f"{v} {m['size'][0]}x{m['size'][1]}"
                                                                      for v, m in zip(videos, metas)))
        source_size, source_fps = tuple(metas[0]["size"]), float(metas[0]["fps"])
        estimate = int(round(metas[0]["duration"] * source_fps)) or None
        views = [decoded_frames(v, config.color) for v in videos]
        where = str(videos[0])
    else:
        if pose.images is None:
            raise ConfigError(f"{config.labels}: without --video the labels must name labelled stills (image files)")
        if config.fps is not None:
            raise ConfigError("--fps resamples video: labelled stills have no frame rate")
        missing = [p for p in pose.images if not p.is_file()]
        if missing:
            raise DataError(f"{config.labels}: names {len(missing)} still(s) that do not exist (first {missing[0]})")
        from PIL import Image

        with Image.open(pose.images[0]) as first:
            source_size = first.size
        if config.neural:
            raise ConfigError("--neural goes with a video: labelled stills are not a recording")
        source_fps, estimate = None, len(pose.images)
        views = [still_frames(pose.images, config.color)]
        where = str(config.labels)
    frame_size, full_pose = source_size, pose
    centred = config.centre_on is not None or config.track_animal
    if config.centre_on is not None and config.centre_on not in pose.names:
        raise DataError(f"{config.labels}: no keypoint '{config.centre_on}' to centre on "
                        f"(has {', '.join(pose.names)})")
    if config.align is not None:
        missing = [name for name in config.align if name not in pose.names]
        if missing:
            raise DataError(f"{config.labels}: --align {','.join(config.align)}: no keypoint(s) "
                            f"{', '.join(missing)} (has {', '.join(pose.names)})")
    if centred:
        source_size = (config.window, config.window)  # what the geometry resizes: the window
    if config.keypoints is not None:
        pose = pose.select(config.keypoints, str(config.labels))
    geometry = FrameGeometry.plan(source_size, (config.x_pixels, config.y_pixels), config.crop, config.fit)
    neural = read_neural(Path(config.neural), config.neural_key) if config.neural else None
    neural_rows_in_file = 0 if neural is None else len(neural)
    if neural is not None and config.max_frames is not None:
        neural = neural[: neural_rows_covering(config.max_frames, config.neural_fps or source_fps, source_fps)]
    out_fps = config.fps or source_fps
    if estimate is not None and config.max_frames is not None:
        estimate = min(estimate, config.max_frames)
    expected = estimate if out_fps == source_fps or estimate is None else int(estimate * out_fps / source_fps)
    if expected is not None and config.trial_length > expected * 1.05 + 1:
        raise DataError(f"--trial-length {config.trial_length} is longer than {where} (about {expected} frames"
                        f"{f' at {out_fps:g} fps' if out_fps else ''})")
    if pose is not None and estimate is not None and videos:
        # duration x frame rate only estimates the frames: this catches the wrong file before the
        # decode, and the exact count after the decode decides
        slack = max(2, estimate // 100)
        label_rows = (f"{pose.n_frames} labelled frames"
                      f"{_of_the_file(pose.n_frames, label_rows_in_file, config.max_frames, ' (', ')')}")
        if pose.n_frames < estimate - slack:
            raise DataError(f"{config.labels} has {label_rows} but {where} has about {estimate} frames "
                            f"(its duration x frame rate)")
        if pose.n_frames > estimate + slack + config.trim_extra_frames:
            raise DataError(f"{config.labels} has {label_rows} but {where} has about {estimate} frames "
                            f"(its duration x frame rate); if the table starts at the video's first frame and "
                            f"runs on past its end, --trim-extra-frames N drops its last N rows")
    windows, track = None, None
    if centred:
        windows, track = _centred_windows(config, full_pose, videos, frame_size, estimate, echo)
    labels = None
    if pose is not None:
        labels = flat_labels(geometry.points(pose.xy if windows is None else windows.points(pose.xy)))

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    progress = Progress(expected, f"  {out.name}: frames written", echo, unit="frame")
    notes, trimmed = [], {}
    try:
        with h5py.File(partial, "w") as f:
            n_source, n_out = _write(f, config, geometry, windows, track, views, videos, labels, source_fps,
                                     out_fps, progress)
            if windows is not None:
                f["animal_track"].attrs.update(_track_attributes(config, windows, track, frame_size))
            if labels is not None:
                counts = (f"{config.labels} has {len(labels)} labelled frames"
                          f"{_of_the_file(len(labels), label_rows_in_file, config.max_frames, ' (', ')')} "
                          f"but {where} has {n_source} frames")
                trimmed["labels"] = _label_rows_past_the_end(config, counts, len(labels), n_source)
                if trimmed["labels"]:
                    notes.append(_trim_note(counts, trimmed["labels"], config.trim_extra_frames, "labels"))
            if neural is not None:
                neural_fps = config.neural_fps or source_fps
                counts = (f"{config.neural} has {len(neural)} rows ({len(neural) / neural_fps:.3f} s at "
                          f"{neural_fps:g} Hz{_of_the_file(len(neural), neural_rows_in_file, config.max_frames)}) "
                          f"but {where} has {n_source} frames ({n_source / source_fps:.3f} s)")
                trimmed["neural"] = _neural_rows_past_the_end(config, counts, len(neural), n_source, neural_fps,
                                                              source_fps)
                if trimmed["neural"]:
                    neural = neural[: len(neural) - trimmed["neural"]]
                    notes.append(_trim_note(counts, trimmed["neural"], config.trim_extra_frames, "neural"))
                _write_neural(f, neural_per_frame(neural, neural_fps, out_fps or neural_fps, n_out),
                              config.trial_length)
            f.attrs.update({
                "frame_rate": out_fps or 0.0, "source_frame_rate": source_fps or 0.0,
                "sources": json.dumps([str(v) for v in videos] or [str(config.labels)]),
                "labels_source": str(config.labels or ""), "neural_source": str(config.neural or ""),
                "label_names": json.dumps(pose.flat_names() if pose else []),
                "geometry": json.dumps(asdict(geometry)),
                "labels_rows_in_file": label_rows_in_file, "labels_rows_trimmed": trimmed.get("labels", 0),
                "neural_rows_in_file": neural_rows_in_file, "neural_rows_trimmed": trimmed.get("neural", 0),
                "centring": windows.method if windows is not None else "",
            })
            if config.masks:
                f.attrs["mask_background_weight"] = config.mask_background_weight
        os.replace(partial, out)
    finally:
        progress.close()
        partial.unlink(missing_ok=True)
    for note in notes:
        echo(note)
    figure = None
    if windows is not None:
        figure = _track_figure(out, config, windows, track, videos, full_pose, frame_size, n_source)
    n_trials = n_out // config.trial_length
    config_path = write_data_config(out, config, result_channels(config, videos),
                                    None if neural is None else is_counts(neural))
    n_tracked = 0 if track is None else min(track.n_frames, n_source)
    return BuildSummary(out, config_path, n_trials, config.trial_length, n_source, n_out - n_trials * config.trial_length,
                        (result_channels(config, videos), config.y_pixels, config.x_pixels), out_fps,
                        0 if labels is None else labels.shape[1], 0 if neural is None else neural.shape[1],
                        time.perf_counter() - started, trimmed,
                        centring=None if windows is None else windows.method, window=config.window if centred else None,
                        align=config.align, n_frames_tracked=n_tracked,
                        n_frames_found=0 if track is None else int(track.found[:n_tracked].sum()),
                        track_figure=figure, masks=config.masks,
                        mask_background_weight=config.mask_background_weight if config.masks else None)


def _centred_windows(config: BuildConfig, pose, videos: list[Path], frame_size: tuple[int, int],
                     estimate: int | None, echo: Callable[[str], None]):
    """The windows of a centred build (around a keypoint or the tracked animal, rotated for
    ``--align``) and, for ``--track-animal`` or ``--masks``, the animal's track."""
    from bnet.data.animal import Windows, body_rotation, track_animal

    keypoint = None
    if config.centre_on is not None:
        keypoint = held_positions(pose.xy[:, pose.names.index(config.centre_on)])
    rotation = None
    if config.align is not None:
        rotation = body_rotation(pose.xy, pose.names, *config.align, config.track_smooth, str(config.labels))
    track = None
    if config.track_animal or config.masks:
        track = track_animal(videos[0], frame_size, estimate=estimate, limit=config.max_frames,
                             smooth=config.track_smooth, near=keypoint, keep_blobs=config.masks, echo=echo)
    if keypoint is not None:
        return Windows.around(keypoint, config.window, rotation, f"centre-on:{config.centre_on}"), track
    return Windows.around(track.centres, config.window, rotation, "track-animal"), track


def _track_attributes(config: BuildConfig, windows, track, frame_size: tuple[int, int]) -> dict:
    attrs = {
        "columns": json.dumps(["x", "y", "rotation"]),
        "description": "per frame: the window's centre (x, y) in source pixels (pixel i spans [i, i+1)) and its "
                       "rotation in degrees counter-clockwise on screen (PIL's Image.rotate; 0 without --align): "
                       "the frame shows the source rotated by it about that centre, cut to window x window px",
        "window": config.window, "source_width": frame_size[0], "source_height": frame_size[1],
        "method": windows.method, "align": ",".join(config.align or ()), "track_smooth": config.track_smooth,
    }
    if track is not None:
        attrs.update({"frames_found": int(track.found.sum()), "frames_tracked": track.n_frames,
                      "threshold_low": track.thresholds[0], "threshold_high": track.thresholds[1],
                      "tracking_scale": json.dumps(list(track.scale)),
                      "background_frames": track.n_background_frames})
    return attrs


def _track_figure(out: Path, config: BuildConfig, windows, track, videos: list[Path], pose, frame_size, n_source):
    """``OUT.track.png``: the windows' centres over the background (or the first frame)."""
    from bnet.data.animal import Windows
    from bnet.plotting.animal import track_figure

    if track is not None:
        background = track.background
    else:
        background = _first_frame(videos, pose)
    where = videos[0].name if videos else Path(config.labels).name
    what = ("the animal found by background subtraction" if windows.method == "track-animal"
            else f"keypoint {config.centre_on}")
    title = f"{where}: {config.window} px windows around {what}"
    if track is not None:
        n = min(track.n_frames, n_source)
        title += f"\nfound in {int(track.found[:n].sum())} of {n} frames"
    if config.align is not None:
        title += f"; rotated so that {config.align[1]} -> {config.align[0]} points up (arrows)"
    found = None if track is None or windows.method != "track-animal" else track.found
    shown = Windows(windows.centres[:n_source], windows.side,
                    None if windows.rotation is None else windows.rotation[:n_source], windows.method)
    return track_figure(out.with_suffix(".track.png"), background, frame_size, shown, found, title)


def _first_frame(videos: list[Path], pose) -> np.ndarray:
    """The first frame, gray (of the first video, or the first still)."""
    frames = decoded_frames(videos[0], "gray") if videos else still_frames(pose.images[:1], "gray")
    try:
        return np.asarray(next(iter(frames)))
    finally:
        frames.close()


def neural_rows_covering(n_frames: int, neural_fps: float, source_fps: float) -> int:
    """The neural rows that start before the end of the first ``n_frames`` video frames."""
    return math.ceil(n_frames * neural_fps / source_fps - 1e-9)


def _of_the_file(n_used: int, n_in_file: int, max_frames: int | None, before: str = "; ", after: str = "") -> str:
    """Where ``--max-frames`` kept the first rows of a file only, which they are (else nothing)."""
    if n_used == n_in_file:
        return ""
    return f"{before}its first {n_used} of {n_in_file}, for --max-frames {max_frames}{after}"


def _label_rows_past_the_end(config: BuildConfig, counts: str, n_rows: int, n_frames: int) -> int:
    """The label rows past the video's last frame, to drop (``counts`` says both counts): at
    most ``--trim-extra-frames`` of them; fewer rows than frames is an error."""
    n_extra = n_rows - n_frames
    if n_extra < 0:
        unlabelled = "frame has" if n_extra == -1 else f"{-n_extra} frames have"
        raise DataError(f"{counts}: the video's last {unlabelled} no labels; if the table starts at the video's "
                        f"first frame, --max-frames {n_rows} builds from the labelled frames only")
    if n_extra > config.trim_extra_frames:
        raise DataError(f"{counts}: the table's last {_rows(n_extra)} past the video's end, more than "
                        f"--trim-extra-frames allows ({config.trim_extra_frames}); if the table starts at the "
                        f"video's first frame, --trim-extra-frames {n_extra} drops them")
    return n_extra


def _neural_rows_past_the_end(config: BuildConfig, counts: str, n_rows: int, n_frames: int, neural_fps: float,
                              source_fps: float) -> int:
    """The neural rows wholly past the video's last frame, to drop: as many as
    ``--trim-extra-frames`` frames hold. A recording may end within one of its samples of the
    video's end (where its sampling and the frames' fall)."""
    needed = n_frames * neural_fps / source_fps
    if n_rows < needed - 1 - 1e-9:
        raise DataError(counts)
    n_extra = n_rows - neural_rows_covering(n_frames, neural_fps, source_fps)
    extra_frames = math.ceil(n_extra * source_fps / neural_fps - 1e-9)
    if extra_frames > config.trim_extra_frames:
        raise DataError(f"{counts}: the recording's last {_rows(n_extra)} past the video's end ({extra_frames} "
                        f"frames), more than --trim-extra-frames allows ({config.trim_extra_frames}); if the "
                        f"recording starts at the video's first frame, --trim-extra-frames {extra_frames} drops them")
    return max(0, n_extra)


def _rows(n: int) -> str:
    """``"row is"`` or ``"5 rows are"``: the subject of "... past the video's end"."""
    return "row is" if n == 1 else f"{n} rows are"


def _trim_note(counts: str, n_dropped: int, allowed: int, group: str) -> str:
    dropped = "row, past the video's end, was" if n_dropped == 1 else f"{n_dropped} rows, past the video's end, were"
    return (f"note: {counts}: its last {dropped} dropped (--trim-extra-frames allows {allowed}; recorded in the "
            f"file as {group}_rows_trimmed = {n_dropped})")


def result_channels(config: BuildConfig, videos: list[Path]) -> int:
    return max(1, len(videos)) * (1 if config.color == "gray" else 3)


def _write(f, config, geometry, windows, track, views, videos, labels, source_fps, out_fps,
           progress) -> tuple[int, int]:
    """Images (and labels, masks, the windows) trial by trial; -> (source frames decoded,
    frames written)."""
    groups = {"images": f.create_group("images")}
    if labels is not None:
        groups["labels"], groups["labels_masks"] = f.create_group("labels"), f.create_group("labels_masks")
    if config.masks:
        groups["masks"] = f.create_group("masks")
    if windows is not None:
        groups["animal_track"] = f.create_group("animal_track")
    length = config.trial_length
    images, indices, masks = [], [], []
    n_out = 0
    channels = result_channels(config, videos)
    source = Counted(_zip_views(views, videos), config.max_frames)
    for i, frame in resampled(source, source_fps, out_fps):
        if windows is not None:
            frame = [windows.cut(view, i) for view in frame]
        images.append(np.concatenate([geometry.frame(view) for view in frame]))
        if config.masks:
            blob = track.blobs[min(i, len(track.blobs) - 1)]
            masks.append(windows.mask(blob, i, track.scale, geometry, config.mask_background_weight, channels))
        indices.append(i)
        n_out += 1
        if len(images) == length:
            _flush(groups, n_out // length - 1, images, indices, labels, masks, windows)
            progress.update(length)
            images, indices, masks = [], [], []
    if n_out < length:
        where = str(videos[0]) if videos else str(config.labels)
        raise DataError(f"--trial-length {length} is longer than {where} ({n_out} frames"
                        f"{f' at {out_fps:g} fps' if out_fps else ''})")
    return source.count, n_out


def _write_neural(f, per_frame: np.ndarray, length: int) -> None:
    group = f.create_group("neural")
    for t in range(len(per_frame) // length):
        group.create_dataset(trial_name(t), data=per_frame[t * length : (t + 1) * length])


def _zip_views(views, videos) -> Iterator[tuple]:
    """One frame of every view at a time; views that end at different frames are an error."""
    iterators = [iter(v) for v in views]
    count = 0
    while True:
        frame = []
        for view in iterators:
            frame.append(next(view, None))
        ended = [f is None for f in frame]
        if all(ended):
            return
        if any(ended):
            counts = [count + (0 if e else 1) for e in ended]
            raise DataError("the views differ in length: " + ", ".join(
                f"{v} {'ends at' if e else 'goes on past'} frame {count}" for v, e, _ in zip(videos, ended, counts)))
        count += 1
        yield tuple(frame)


class Counted:
    """Source frames, counted (resampled or not), up to ``limit``."""

    def __init__(self, items: Iterator, limit: int | None = None):
        self.items, self.limit, self.count = items, limit, 0

    def __iter__(self):
        for item in self.items:
            if self.limit is not None and self.count == self.limit:
                return
            self.count += 1
            yield item


def _flush(groups, trial: int, images, indices, labels, masks=None, windows=None) -> None:
    name = trial_name(trial)
    stack = np.stack(images)
    groups["images"].create_dataset(name, data=stack, chunks=(1, *stack.shape[1:]))
    if "masks" in groups:
        groups["masks"].create_dataset(name, data=np.stack(masks), chunks=(1, *stack.shape[1:]))
    if windows is not None:
        groups["animal_track"].create_dataset(name, data=windows.rows(indices))
    if labels is not None:
        rows = labels[np.minimum(indices, len(labels) - 1)]
        groups["labels"].create_dataset(name, data=np.nan_to_num(rows))
        groups["labels_masks"].create_dataset(name, data=np.isfinite(rows).astype(np.float32))


def write_data_config(session: Path, config: BuildConfig, n_channels: int, neural_counts: bool | None) -> Path:
    """A BehaveNet data JSON beside the session (``bnet tune ... --data-config FILE``)."""
    path = session.with_suffix(".json")
    content = {"data": str(session.resolve()), "n_input_channels": n_channels, "y_pixels": config.y_pixels,
               "x_pixels": config.x_pixels, "use_output_mask": bool(config.masks)}
    if neural_counts is not None:
        content["neural_type"] = "spikes" if neural_counts else "ca"
    path.write_text(json.dumps(content, indent=2) + "\n")
    return path
