"""Figures of label-supervised AEs (PS-VAE, MSPS-VAE): label reconstructions, latent
traversals as a grid image and as a movie."""

from __future__ import annotations

import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bnet.errors import BnetError  # noqa: E402
from bnet.plotting.movies import ffmpeg_available, write_panel_movie  # noqa: E402

TRAVERSAL_STEPS = 7
MAX_TRAVERSED = 8  # latents shown per figure: the movie and the grid stay legible


def plot_label_reconstructions(labels: np.ndarray, predicted: np.ndarray, mask: np.ndarray, names: list[str],
                               r2: float, title: str = ""):
    """True (observed entries) and predicted labels over the frames of one trial, one row per label."""
    n = labels.shape[1]
    shown = min(n, 8)
    figure, axes = plt.subplots(shown, 1, figsize=(7, 1.2 * shown + 0.6), sharex=True, squeeze=False)
    frames = np.arange(len(labels))
    for i in range(shown):
        ax = axes[i, 0]
        observed = np.where(mask[:, i] > 0, labels[:, i], np.nan)
        ax.plot(frames, observed, color="black", linewidth=1.2, label="label")
        ax.plot(frames, predicted[:, i], color="tab:orange", linewidth=1, label="from supervised latent")
        ax.set_ylabel(names[i], fontsize=8)
    axes[0, 0].legend(frameon=False, fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("frame")
    figure.suptitle(f"{title} (label R² {r2:.3f}{'' if shown == n else f', first {shown} of {n} labels'})",
                    fontsize=10)
    figure.tight_layout()
    return figure


def traversal_values(latents: np.ndarray, steps: int = TRAVERSAL_STEPS) -> np.ndarray:
    """(steps, D) values from each latent's 5th to 95th percentile of the given latents."""
    low, high = np.percentile(latents, 5, axis=0), np.percentile(latents, 95, axis=0)
    return low + np.linspace(0, 1, steps)[:, None] * (high - low)


@torch.no_grad()
def traversal_frames(model, base: np.ndarray, dims: list[int], values: np.ndarray, session: int | None = None,
                     device=torch.device("cpu")) -> np.ndarray:
    """Decoded frames (len(dims), len(values), Y, X): latent ``dims[i]`` set to each value
    in turn, the others held at ``base``."""
    codes = np.repeat(base[None, None, :], len(dims) * len(values), 0).reshape(len(dims), len(values), -1).copy()
    for i, dim in enumerate(dims):
        codes[i, :, dim] = values[:, dim]
    latents = torch.from_numpy(codes.reshape(-1, codes.shape[-1])).float().to(device)
    session_index = None if session is None else torch.full((len(latents),), session, dtype=torch.long, device=device)
    frames = model.to(device).eval().decode(latents, session_index).float().cpu().numpy()
    return frames[:, 0].reshape(len(dims), len(values), *frames.shape[-2:])


def latent_names(model) -> tuple[list[int], list[str]]:
    """The latents a traversal shows (supervised first, capped) and their names."""
    dims, names = [], []
    groups = model.latent_groups()
    for group, where in groups.items():
        for d in range(model.n_latents)[where]:
            dims.append(d)
            names.append(f"{group[:5]}. {d - (where.start or 0)}" if len(groups) > 1 else f"{group} {d}")
    return dims[:MAX_TRAVERSED], names[:MAX_TRAVERSED]


def plot_traversal_grid(frames: np.ndarray, names: list[str], title: str = ""):
    """Rows: latents; columns: the traversal's steps (low to high)."""
    rows, columns = frames.shape[:2]
    figure, axes = plt.subplots(rows, columns, figsize=(1.3 * columns, 1.35 * rows + 0.5), squeeze=False)
    for i in range(rows):
        for j in range(columns):
            axes[i, j].imshow(frames[i, j], cmap="gray", vmin=0, vmax=1)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
        axes[i, 0].set_ylabel(names[i], fontsize=8)
    for j, label in ((0, "5th pct."), (columns - 1, "95th pct.")):
        axes[0, j].set_title(label, fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def write_traversal_movie(model, base: np.ndarray, latents: np.ndarray, path: str | Path, session: int | None = None,
                          n_frames: int = 60, fps: int = 15, device=torch.device("cpu")) -> Path:
    """A movie with one panel per latent, each sweeping its latent back and forth between
    the 5th and 95th percentile while the others stay at ``base``."""
    dims, names = latent_names(model)
    phase = 0.5 - 0.5 * np.cos(np.linspace(0, 2 * np.pi, n_frames))
    values = traversal_values(latents, 2)
    sweep = values[0] + phase[:, None] * (values[1] - values[0])
    frames = traversal_frames(model, base, dims, sweep, session, device)
    return write_panel_movie([frames[i] for i in range(len(dims))], names, path, fps)


def log_ps_vae_figures(run, model, session, split, outputs, r2: float, device, echo) -> None:
    """Label reconstructions of a test trial, the traversal grid and the traversal movie,
    logged as artifacts of ``run`` (the movie skipped, with a message, without ffmpeg)."""
    from bnet.tracking import conventions as tags

    test = outputs["test"]  # rows: the first session's test trials first, in order
    trial = split.test[0]
    rows = slice(0, session.n_frames[session.trials.index(trial)])
    names = [f"label {i}" for i in range(test["labels"].shape[1])]
    run.log_figure(plot_label_reconstructions(np.nan_to_num(test["labels"][rows]), test["predicted"][rows],
                                              test["label_mask"][rows], names, r2,
                                              f"{model.config.model_class}: test trial {trial}"), "label_reconstructions")
    latents = outputs["train"]["latents"]
    base = np.median(latents, axis=0)
    dims, latent_labels = latent_names(model)
    grid = traversal_frames(model, base, dims, traversal_values(latents), None if model.config.n_sessions == 1 else 0,
                            device)
    run.log_figure(plot_traversal_grid(grid, latent_labels, f"{model.config.model_class} latent traversals"),
                   "latent_traversals")
    if not ffmpeg_available():
        echo("  note: no ffmpeg (pip install imageio-ffmpeg): the latent traversal movie is not written")
        return
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = write_traversal_movie(model, base, latents, Path(tmp) / "latent_traversals.mp4",
                                         None if model.config.n_sessions == 1 else 0, device=device)
        except BnetError as err:
            echo(f"  note: the latent traversal movie is not written: {err}")
            return
        run.log_file(path, tags.PLOTS_DIR)
