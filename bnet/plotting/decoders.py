"""True vs predicted traces of decoders."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

INTERVAL_90 = 1.6449
"""Half a Gaussian's central 90% interval, in standard deviations."""


def plot_predictions(targets: list[np.ndarray], predictions: list[np.ndarray], titles: list[str], kind: str,
                     max_dims: int = 4):
    """One row per trial: true (black) and predicted (colour) traces; for states, the true
    state and the predicted probability of each state."""
    n = len(targets)
    figure, axes = plt.subplots(n, 1, figsize=(10, 2.2 * n), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, true, predicted, title in zip(axes[:, 0], targets, predictions, titles):
        frames = np.arange(len(predicted))
        if kind == "categorical":
            ax.imshow(predicted.T, aspect="auto", cmap="Greys", vmin=0, vmax=1, origin="lower",
                      extent=(0, len(predicted), -0.5, predicted.shape[1] - 0.5), interpolation="nearest")
            ax.plot(frames + 0.5, true, color="tab:red", linewidth=1.2, label="true state")
            ax.set_ylabel("state")
        else:
            for d in range(min(max_dims, predicted.shape[1])):
                ax.plot(frames, true[:, d], color="k", linewidth=1.0, alpha=0.7)
                ax.plot(frames, predicted[:, d], color=colours(d), linewidth=1.0)
            ax.set_ylabel("value")
        ax.set_title(title + ("" if kind == "categorical" else "  (black: true, colour: predicted)"),
                     fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("frame")
    figure.tight_layout()
    return figure


def plot_ensemble_curve(sizes: list[int], val_scores: list[float], test_scores: list[float], chosen: int,
                        metric: str):
    figure, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(sizes, val_scores, marker="o", label=f"{metric} (val)")
    ax.plot(sizes, test_scores, marker="s", label=metric.replace("val", "test", 1) + " (test)")
    ax.axvline(chosen, color="gray", linestyle="--", label=f"chosen N = {chosen}")
    ax.set_xlabel("ensemble size N (top-N members)")
    ax.set_ylabel(metric.replace("val_", ""))
    ax.legend(frameon=False, fontsize=8)
    figure.tight_layout()
    return figure


def plot_posterior_latents(truth: list[np.ndarray], direct: list[np.ndarray], means: list[np.ndarray],
                           spreads: list[np.ndarray], titles: list[str], max_dims: int = 4):
    """One row per trial: each latent's true trace (black), the direct decoder's (grey) and the
    Bayesian posterior mean (colour) with its 90% band, each latent in units of its spread in
    the trial, stacked."""
    n_dims = min(truth[0].shape[1], max_dims)
    figure, axes = plt.subplots(len(truth), 1, figsize=(10, 2.4 * len(truth)), squeeze=False)
    for ax, x, d, m, s, title in zip(axes[:, 0], truth, direct, means, spreads, titles):
        frames = np.arange(len(x))
        for dim in range(n_dims):
            centre, unit = x[:, dim].mean(), x[:, dim].std() or 1.0

            def shown(values, dim=dim, centre=centre, unit=unit):
                return (values - centre) / unit + 5.0 * dim

            colour = f"C{dim}"
            ax.plot(frames, shown(x[:, dim]), color="black", lw=1)
            ax.plot(frames, shown(d[:, dim]), color="grey", lw=0.8, ls="--")
            ax.plot(frames, shown(m[:, dim]), color=colour, lw=1.2)
            ax.fill_between(frames, shown(m[:, dim] - INTERVAL_90 * s[:, dim]), shown(m[:, dim] + INTERVAL_90 * s[:, dim]),
                            color=colour, alpha=0.25, lw=0)
        ax.set_title(f"{title}: true (black), direct decoder (grey dashed), posterior mean and 90% band")
        ax.set_yticks([])
    axes[-1, 0].set_xlabel("frame")
    figure.tight_layout()
    return figure


def plot_state_rasters(rows: list[dict[str, np.ndarray]], titles: list[str], n_states: int):
    """One panel per trial: a raster of states per frame, one line per source (the ARHMM's own
    states, the state decoder's argmax, the Bayesian Viterbi path)."""
    figure, axes = plt.subplots(len(rows), 1, figsize=(10, 0.8 + 0.6 * len(rows[0]) * len(rows)), squeeze=False,
                                layout="constrained")
    for ax, row, title in zip(axes[:, 0], rows, titles):
        image = ax.imshow(np.stack(list(row.values())), aspect="auto", interpolation="nearest", cmap="tab10",
                          vmin=0, vmax=max(n_states - 1, 9))
        ax.set_yticks(range(len(row)), list(row))
        ax.set_title(title)
    axes[-1, 0].set_xlabel("frame")
    figure.colorbar(image, ax=axes[:, 0].tolist(), label="state", ticks=range(n_states))
    return figure
