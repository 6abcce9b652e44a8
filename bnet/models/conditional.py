"""Conditional autoencoders (``cond-ae``, ``cond-vae``): the decoder reads the latents and
the frame's labels, so the latents need only encode what the labels do not.

With ``conditional_encoder`` the encoder reads the labels too (as every label-reading
class's may), appended to its flattened conv features (BehaveNet drew them as one-hot label images stacked on the frame, which put
every missing label at pixel (0, 0) and gave ``cond-vae`` the wrong input channels). Labels
that are NaN or masked out read as 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bnet.models.ae import AutoEncoder, EncoderMayReadLabels, LabelReadingConfig, clean_labels
from bnet.models.registry import register
from bnet.models.vae import VAE, VAEConfig


@dataclass
class ConditionalVAEConfig(LabelReadingConfig, VAEConfig):
    """A ``cond-vae``: a label-reading class's and a VAE's hyperparameters."""


class LabelConditioned(EncoderMayReadLabels):
    """The decoder input of conditional classes: latents, then labels."""

    uses_labels = True

    @property
    def n_decoder_inputs(self) -> int:
        return self.n_latents + self.config.n_labels

    def decoder_inputs(self, latents: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([latents, clean_labels(batch).to(latents.dtype)], 1)


@register("cond-ae", family="ae", config_type=LabelReadingConfig)
class ConditionalAE(LabelConditioned, AutoEncoder):
    """Pixel MSE, as ``ae``."""


@register("cond-vae", family="ae", config_type=ConditionalVAEConfig)
class ConditionalVAE(LabelConditioned, VAE):
    """The ELBO with ``vae.beta``, as ``vae``."""
