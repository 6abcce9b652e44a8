"""Frames drawn from labels (``labels-images``): the conv decoder alone, reading a frame's
labels (NaN or masked labels read as 0) and trained on pixel MSE. Its "latents" are the
labels themselves, so it exports none."""

from __future__ import annotations

import torch

from bnet.models.ae import AEConfig, AutoEncoder, clean_labels
from bnet.models.registry import register


@register("labels-images", family="ae", config_type=AEConfig)
class LabelsToImages(AutoEncoder):
    uses_labels = True
    has_encoder = False
    exports_latents = False

    @property
    def n_latents(self) -> int:
        return self.config.n_labels

    def posterior(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, None]:
        return clean_labels(batch), None

    def forward(self, images, session=None, labels=None):
        if labels is None:
            raise ValueError("labels-images draws frames from labels: pass labels=")
        return self.decode(labels, session), labels
