"""How much of a video an autoencoder explains beyond the trivial answer, the mean frame.

A pixel MSE alone says nothing about whether a model saw the animal: an AE that draws the
arena of an open-field video and no mouse has a small MSE, because the mouse covers a few
percent of the pixels. The frame variance explained, ``1 - MSE / MSE of the mean frame``,
puts the error on the scale of the trivial answer (the training split's mean frame of the
session: 0 is no better than it, 1 is perfect). The same ratio over the *moving* pixels
keeps a static background, which any model and the mean frame both draw, from carrying it.
Where the session has masks (``bnet data build --masks``: 1 on the animal), the same ratio over
the pixels they weigh at least half says how well the animal itself is drawn: in a window that
follows an open-field mouse, the arena's wall sweeping through it moves too, and carries most
of the other two.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bnet.data.loader import prefetched

CHANGED_CONTRAST = 0.05
"""A pixel of a frame differs from the mean frame when it is this far from it (13 grey levels of
255): in the open-field video seen whole 0.8% of the pixels of a frame do, in windows centred on
the mouse or a fly 14-22%, on the head-fixed mirror mouse 23%."""

MASKED = 0.5
"""A pixel is the masks' (the animal's) where its mask weighs at least this much."""

MOVING_VARIANCE_SHARE = 0.1
"""A pixel moves when its temporal variance over the training frames is at least this share of
the 99th percentile of the pixels' variances: sensor noise and flicker on a static
background stay below it, the animal's pixels (and a moving shadow) reach it."""


@dataclass
class MeanFrame:
    """The trivial answer for each session of a fit: its training frames' mean, and which
    pixels move over them.

    Attributes:
        mean: ``(n_sessions, C, Y, X)`` float64 mean training frame of each session, in [0, 1].
        moving: ``(n_sessions, C, Y, X)`` bool, the pixels whose training variance is at least
            :data:`MOVING_VARIANCE_SHARE` of the session's 99th-percentile pixel variance.
    """

    mean: np.ndarray
    moving: np.ndarray

    @classmethod
    def of(cls, train_batches, n_sessions: int) -> "MeanFrame":
        """From a split's batches (each a dict with ``images`` and, for several sessions, ``session``)."""
        sums = sum_squares = counts = None
        for i in range(len(train_batches)):
            batch = train_batches[i]
            images = batch["images"].double()
            sessions = batch.get("session", torch.zeros(len(images), dtype=torch.long))
            if sums is None:
                sums = torch.zeros((n_sessions, *images.shape[1:]), dtype=torch.float64)
                sum_squares = torch.zeros_like(sums)
                counts = torch.zeros(n_sessions, dtype=torch.float64)
            sums.index_add_(0, sessions, images)
            sum_squares.index_add_(0, sessions, images * images)
            counts.index_add_(0, sessions, torch.ones(len(images), dtype=torch.float64))
        shape = (-1,) + (1,) * (sums.dim() - 1)
        mean = sums / counts.clamp_min(1).view(shape)
        variance = (sum_squares / counts.clamp_min(1).view(shape) - mean * mean).clamp_min(0)
        flat = variance.flatten(1)
        threshold = MOVING_VARIANCE_SHARE * torch.quantile(flat, 0.99, dim=1)
        moving = (flat >= threshold[:, None]) & (flat > 0)
        return cls(mean.numpy(), moving.view_as(variance).numpy())

    @torch.inference_mode()
    def score(self, model, batches, device: torch.device) -> dict[str, float]:
        """``var_explained``, ``moving_var_explained`` and ``mean_frame_mse`` of ``model``'s
        reconstructions over a split's batches (pixels as the model sees them, in [0, 1]), and
        ``changed_pixel_share``, the share of the frames' pixels that differ from the mean frame
        by :data:`CHANGED_CONTRAST` (how much of the frame the animal covers); with masks in the
        batches, ``masked_var_explained`` over the pixels they weigh at least :data:`MASKED`."""
        mean, moving = torch.from_numpy(self.mean), torch.from_numpy(self.moving)
        # model and mean-frame squared errors: all, moving and masked pixels; pixels off the mean frame
        sums = torch.zeros(7, dtype=torch.float64)
        masked = False
        n_values = 0
        model.to(device).eval()
        for batch in prefetched(batches, range(len(batches)), device):
            reconstruction = model.reconstruct(batch, model.posterior(batch)[0]).double().cpu()
            images = batch["images"].double().cpu()
            sessions = batch.get("session", torch.zeros(len(images), dtype=torch.long)).cpu()
            model_error = (images - reconstruction) ** 2
            mean_error = (images - mean[sessions]) ** 2
            where = moving[sessions]
            sums[:5] += torch.stack([model_error.sum(), mean_error.sum(), model_error[where].sum(),
                                     mean_error[where].sum(), (mean_error > CHANGED_CONTRAST**2).sum()])
            if "masks" in batch:
                on_mask = batch["masks"].cpu() >= MASKED
                sums[5:] += torch.stack([model_error[on_mask].sum(), mean_error[on_mask].sum()])
                masked = True
            n_values += images.numel()
        model_sse, mean_sse, model_moving, mean_moving, changed, model_masked, mean_masked = sums.tolist()
        scores = {"var_explained": variance_explained(model_sse, mean_sse),
                  "moving_var_explained": variance_explained(model_moving, mean_moving),
                  "mean_frame_mse": mean_sse / max(n_values, 1), "changed_pixel_share": changed / max(n_values, 1)}
        if masked:
            scores["masked_var_explained"] = variance_explained(model_masked, mean_masked)
        return scores


def variance_explained(model_sse: float, trivial_sse: float) -> float:
    """``1 - model_sse / trivial_sse``; NaN where the trivial answer is already exact."""
    return 1.0 - model_sse / trivial_sse if trivial_sse > 0 else float("nan")
