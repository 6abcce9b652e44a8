"""Figures of fitted ARHMMs: state rasters, durations, transitions, AR dynamics."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def state_colormap(n_states: int):
    return plt.get_cmap("tab20" if n_states > 10 else "tab10", max(n_states, 2))


def plot_state_raster(observations: list[np.ndarray], states: list[np.ndarray], titles: list[str],
                      n_states: int, observation_name: str = "latent"):
    """One panel per trial: the states as coloured bands behind the observed traces."""
    n = len(observations)
    figure, axes = plt.subplots(n, 1, figsize=(10, 1.9 * n), squeeze=False)
    cmap = state_colormap(n_states)
    for ax, x, z, title in zip(axes[:, 0], observations, states, titles):
        span = np.abs(x).max() or 1.0
        ax.imshow(z[None], aspect="auto", cmap=cmap, vmin=-0.5, vmax=cmap.N - 0.5, alpha=0.35,
                  extent=(0, len(z), -span * 1.1, span * 1.1), interpolation="nearest")
        for d in range(x.shape[1]):
            ax.plot(np.arange(len(x)) + 0.5, x[:, d], color="k", linewidth=0.8, alpha=0.7)
        ax.set_ylabel(observation_name, fontsize=8)
        ax.set_title(title, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("frame")
    figure.tight_layout()
    return figure


def run_lengths(states: list[np.ndarray], n_states: int) -> list[list[int]]:
    """Durations (frames) of every run of each state, over all trials."""
    durations: list[list[int]] = [[] for _ in range(n_states)]
    for z in states:
        if len(z) == 0:
            continue
        change = np.flatnonzero(np.diff(z)) + 1
        starts = np.concatenate([[0], change])
        ends = np.concatenate([change, [len(z)]])
        for start, end in zip(starts, ends):
            durations[int(z[start])].append(int(end - start))
    return durations


def plot_durations(durations: list[list[int]]):
    n_states = len(durations)
    figure, ax = plt.subplots(figsize=(6, 3.5))
    cmap = state_colormap(n_states)
    longest = max([max(d) for d in durations if d] + [1])
    bins = np.arange(1, longest + 2) if longest <= 60 else np.linspace(1, longest + 1, 40)
    for k, d in enumerate(durations):
        if d:
            ax.hist(d, bins=bins, histtype="step", color=cmap(k), label=f"state {k} (median {np.median(d):.0f})")
    ax.set_xlabel("state duration (frames)")
    ax.set_ylabel("count")
    ax.legend(fontsize=7, frameon=False)
    figure.tight_layout()
    return figure


def plot_transition_matrix(matrix: np.ndarray):
    figure, ax = plt.subplots(figsize=(4.5, 4))
    image = ax.imshow(matrix, cmap="Greys", vmin=0, vmax=1)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if matrix[i, j] > 0.5 else "black")
    ax.set_xlabel("next state")
    ax.set_ylabel("state")
    ax.set_title("transition probabilities")
    figure.colorbar(image, ax=ax, fraction=0.046)
    figure.tight_layout()
    return figure


def plot_dynamics(As: np.ndarray):
    """Each state's AR matrices [A_1 ... A_L] side by side, one shared colour scale."""
    n_states = As.shape[0]
    scale = np.abs(As).max() or 1.0
    figure, axes = plt.subplots(1, n_states, figsize=(2.2 * n_states, 2.4), squeeze=False)
    for k, ax in enumerate(axes[0]):
        image = ax.imshow(As[k], cmap="RdBu_r", vmin=-scale, vmax=scale)
        ax.set_title(f"state {k}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    figure.colorbar(image, ax=axes[0].tolist(), fraction=0.02)
    figure.suptitle("AR dynamics (A_1 ... A_L per state)", fontsize=10)
    return figure
