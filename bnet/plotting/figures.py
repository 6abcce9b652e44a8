"""Training curves and reconstruction panels."""

from __future__ import annotations

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_training_curves(epochs, train_loss, val_epochs, val_loss, best_epoch: int | None = None,
                         title: str = ""):
    """Train and val loss per epoch (log scale), the selected epoch marked."""
    figure, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epochs, train_loss, label="train", color="tab:blue")
    ax.plot(val_epochs, val_loss, label="val", color="tab:orange", marker="o", markersize=3)
    if best_epoch is not None and best_epoch >= 0:
        ax.axvline(best_epoch, color="gray", linestyle="--", linewidth=1, label=f"best (epoch {best_epoch})")
    values = np.concatenate([np.asarray(train_loss, float), np.asarray(val_loss, float)])
    if values.size and np.all(values > 0):
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(frameon=False)
    figure.tight_layout()
    return figure


def plot_reconstructions(originals: np.ndarray, reconstructions: np.ndarray, labels: list[str],
                         title: str = ""):
    """Rows: original, reconstruction, difference; columns: frames (channel 0 shown).

    ``originals`` and ``reconstructions`` are (N, C, Y, X) in [0, 1].
    """
    n = len(originals)
    figure, axes = plt.subplots(3, n, figsize=(1.8 * n, 5.6), squeeze=False)
    for j in range(n):
        difference = reconstructions[j, 0] - originals[j, 0]
        panels = [(originals[j, 0], "gray", (0, 1)), (reconstructions[j, 0], "gray", (0, 1)),
                  (difference, "RdBu_r", (-0.5, 0.5))]
        for i, (image, cmap, (low, high)) in enumerate(panels):
            axes[i, j].imshow(image, cmap=cmap, vmin=low, vmax=high)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
        axes[0, j].set_title(labels[j], fontsize=8)
    for i, name in enumerate(["original", "reconstruction", "difference"]):
        axes[i, 0].set_ylabel(name, fontsize=9)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure
