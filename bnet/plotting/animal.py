"""The figure of an animal-centred build (``bnet data build --track-animal``/``--centre-on``):
where its windows were over the arena, for the user to check before training."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bnet.data.animal import Windows


def track_figure(path: Path, background: np.ndarray, source: tuple[int, int], windows: Windows,
                 found: np.ndarray | None, title: str, n_windows: int = 6) -> Path:
    """The track over the background (coloured by time), a few windows drawn as squares (with
    the body axis, where aligned), frames where the animal was interpolated marked; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    from matplotlib.patches import Polygon

    width, height = source
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(background, cmap="gray", extent=(0, width, height, 0), interpolation="bilinear")
    centres = windows.centres
    n = len(centres)
    segments = np.stack([centres[:-1], centres[1:]], axis=1) if n > 1 else np.zeros((0, 2, 2))
    lines = LineCollection(segments, cmap="viridis", linewidths=1.2)
    lines.set_array(np.arange(max(n - 1, 0)))
    ax.add_collection(lines)
    fig.colorbar(lines, ax=ax, fraction=0.04, pad=0.02, label="frame")
    if found is not None and (~found).any():
        missing = np.flatnonzero(~found[: n])
        ax.scatter(centres[missing, 0], centres[missing, 1], s=6, c="red", marker="x", linewidths=0.6,
                   label=f"interpolated ({len(missing)} frames)", zorder=3)
        ax.legend(loc="lower right", fontsize=8)
    colours = plt.get_cmap("viridis")
    reach = np.array([[0.0, 0.0], [width, height]])
    for k in np.unique(np.linspace(0, n - 1, min(n_windows, n)).round().astype(int)):
        colour = colours(k / max(n - 1, 1))
        corners = windows.corners(k)
        reach = np.array([np.minimum(reach[0], corners.min(axis=0)), np.maximum(reach[1], corners.max(axis=0))])
        ax.add_patch(Polygon(corners, closed=True, fill=False, edgecolor=colour, linewidth=1.2))
        if windows.rotation is not None:  # the window's up, where the head points
            a, b, c, d, e, f = windows.affine(k)
            s = windows.side
            top = (a * s / 2 + b * s * 0.1 + c, d * s / 2 + e * s * 0.1 + f)
            ax.annotate("", xy=top, xytext=tuple(windows.centre(k)),
                        arrowprops={"arrowstyle": "->", "color": colour, "lw": 1.2})
    ax.set_xlim(reach[0, 0], reach[1, 0])  # the frame, and the windows that reach past it (black there)
    ax.set_ylim(reach[1, 1], reach[0, 1])
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("x (source px)")
    ax.set_ylabel("y (source px)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
