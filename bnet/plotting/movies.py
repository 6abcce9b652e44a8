"""Movies of panels side by side: syllable clips (one panel per discrete state), latent
traversals (one panel per latent)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.animation as animation  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bnet.errors import BnetError  # noqa: E402


def state_segments(states: dict[int, np.ndarray], state: int, min_frames: int) -> list[tuple[int, int, int]]:
    """(trial, start, stop) of every run of ``state`` at least ``min_frames`` long."""
    segments = []
    for trial, z in sorted(states.items()):
        inside = np.concatenate([[False], z == state, [False]])
        edges = np.flatnonzero(np.diff(inside.astype(np.int8)))
        for start, stop in zip(edges[::2], edges[1::2]):
            if stop - start >= min_frames:
                segments.append((trial, int(start), int(stop)))
    return segments


def ffmpeg_available() -> bool:
    """Whether matplotlib can write mp4: ffmpeg on the PATH, or the binary imageio-ffmpeg ships."""
    if animation.writers.is_available("ffmpeg"):
        return True
    try:
        import imageio_ffmpeg

        matplotlib.rcParams["animation.ffmpeg_path"] = imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        return False
    return animation.writers.is_available("ffmpeg")


def write_panel_movie(panels: list[np.ndarray], titles: list[str], path: str | Path, fps: int = 20) -> Path:
    """Write a movie of panels side by side; ``panels[k]`` is (T, Y, X) in [0, 1].

    ``.mp4`` needs ffmpeg (matplotlib's FFMpegWriter); ``.gif`` is written with Pillow.
    """
    path = Path(path)
    if path.suffix == ".gif":
        writer = animation.PillowWriter(fps=fps)
    elif path.suffix == ".mp4":
        if not ffmpeg_available():
            raise BnetError(f"{path}: writing .mp4 needs ffmpeg (pip install imageio-ffmpeg, or apt-get install "
                            f"ffmpeg), or ask for a .gif instead")
        writer = animation.FFMpegWriter(fps=fps)
    else:
        raise BnetError(f"{path}: movies are .mp4 (ffmpeg) or .gif")
    n = len(panels)
    columns = min(n, 4)
    rows = int(np.ceil(n / columns))
    length = max(len(p) for p in panels)
    figure, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.6 * rows), squeeze=False)
    images = []
    for ax, panel, title in zip(axes.flat, panels, titles):
        images.append(ax.imshow(panel[0], cmap="gray", vmin=0, vmax=1))
        ax.set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.flat[n:]:  # the grid's unused cells
        ax.set_axis_off()

    def draw(i):
        for image, panel in zip(images, panels):
            image.set_data(panel[i] if i < len(panel) else np.zeros_like(panel[0]))
        return images

    path.parent.mkdir(parents=True, exist_ok=True)
    animation.FuncAnimation(figure, draw, frames=length, blit=True).save(path, writer=writer)
    plt.close(figure)
    return path


def state_raster_frames(rows: list[np.ndarray], n_states: int, half_window: int = 25, row_height: int = 12,
                        frame_width: int = 3) -> np.ndarray:
    """Movie frames (T, len(rows) * row_height, (2 half_window + 1) frame_width) of state rasters:
    one band per row of states (T,), a grey level per state (0.3 to 1), a window of frames around
    the current one, which is the black column at the centre (so a long trial costs no more than
    a short one); beyond the trial's ends the bands are dark (0.1)."""
    states = 0.3 + 0.7 * np.stack(rows).astype(float) / max(n_states - 1, 1)  # (R, T)
    n_frames = states.shape[1]
    padded = np.pad(states, ((0, 0), (half_window, half_window)), constant_values=0.1)
    frames = np.stack([padded[:, t : t + 2 * half_window + 1] for t in range(n_frames)])  # (T, R, W)
    frames[:, :, half_window] = 0.0
    return np.repeat(np.repeat(frames, row_height, axis=1), frame_width, axis=2)
