"""Seeded k-means (k-means++ seeding, then Lloyd's iterations) for the initialisation."""

from __future__ import annotations

import torch


def kmeans(points: torch.Tensor, n_clusters: int, generator: torch.Generator,
           max_iter: int = 100) -> torch.Tensor:
    """Cluster labels (M,) of points (M, D); deterministic for a given generator state."""
    first = torch.randint(points.shape[0], (1,), generator=generator, device=generator.device)
    centers = points[first]
    nearest = (points - centers).square().sum(-1)
    for _ in range(1, n_clusters):
        # Identical points leave no distance to sample by; any point is then as good.
        odds = nearest if nearest.sum() > 0 else torch.ones_like(nearest)
        chosen = torch.multinomial(odds, 1, generator=generator)
        centers = torch.cat([centers, points[chosen]])
        nearest = torch.minimum(nearest, (points - points[chosen]).square().sum(-1))

    labels = torch.cdist(points, centers).argmin(-1)
    for _ in range(max_iter):
        counts = torch.bincount(labels, minlength=n_clusters).to(points.dtype)
        sums = torch.zeros_like(centers).index_add_(0, labels, points)
        # An emptied cluster keeps its centre rather than dividing by zero.
        centers = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centers)
        new_labels = torch.cdist(points, centers).argmin(-1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels
