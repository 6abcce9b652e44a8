"""The matrix subspace projection AE (``cond-ae-msp``, Li et al. 2020, BehaveNet's AEMSP).

A learned matrix ``A`` (labels x latents) reads the labels off the latents, ``y_hat = A z``;
the loss adds ``msp.alpha`` times ``mean((y - A z)^2) + mean((z - A^T A z)^2)`` to the pixel
MSE, so the latents split into the label subspace (rows of ``A``) and its orthogonal
complement, which the decoder uses for everything else. Unlike BehaveNet, unobserved labels
(NaN, or 0 in ``labels_masks``) are left out of the label term.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bnet.errors import ConfigError
from bnet.models.ae import AutoEncoder, EncoderMayReadLabels, LabelReadingConfig, loss_weight
from bnet.models.ae_losses import label_mask, masked_mse
from bnet.models.registry import register


@dataclass
class MSPConfig(LabelReadingConfig):
    """A ``cond-ae-msp``.

    Attributes:
        msp_alpha (``msp.alpha``): weight of the matrix subspace projection loss.
    """

    msp_alpha: float = loss_weight("msp.alpha")


@register("cond-ae-msp", family="ae", config_type=MSPConfig)
class MSPAE(EncoderMayReadLabels, AutoEncoder):
    uses_labels = True

    def check_config(self, config: MSPConfig) -> None:
        super().check_config(config)
        if config.n_ae_latents <= config.n_labels:
            raise ConfigError(f"cond-ae-msp needs more latents than labels (n_ae_latents {config.n_ae_latents}, "
                              f"{config.n_labels} labels): the rest of the latents code what the labels do not")

    def build_heads(self) -> None:
        self.projection = nn.Linear(self.config.n_ae_latents, self.config.n_labels, bias=False)

    def predict_labels(self, latents: torch.Tensor) -> torch.Tensor:
        return self.projection(latents)

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        latents, _ = self.posterior(batch)
        latents = latents.float()
        mse = self.pixel_mse(batch, self.reconstruct(batch, latents))
        labels = batch["labels"]
        predicted = self.predict_labels(latents)
        label_mse = masked_mse(predicted, labels, label_mask(labels, batch.get("labels_masks")))
        back_projected = predicted @ self.projection.weight
        subspace = ((latents - back_projected) ** 2).mean()
        loss = mse + self.config.msp_alpha * (label_mse + subspace)
        return {"loss": loss, "pixel_mse": mse, "label_mse": label_mse, "msp_subspace": subspace}

    def subspace_basis(self) -> np.ndarray:
        """An orthonormal basis whose first ``n_labels`` rows span the label subspace (the
        rows of ``A``, orthonormalised) and whose other rows span its complement."""
        from scipy.linalg import null_space, orth

        weight = self.projection.weight.detach().cpu().double().numpy()
        return np.concatenate([orth(weight.T).T, null_space(weight).T])
