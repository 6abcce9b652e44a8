"""Conditional autoencoders (``cond-ae``, ``cond-vae``): the decoder reads the latents and
the frame's labels, so the latents need only encode what the labels do not.

With ``conditional_encoder`` the encoder reads the labels too, appended to its flattened
conv features (BehaveNet drew them as one-hot label images stacked on the frame, which put
every missing label at pixel (0, 0) and gave ``cond-vae`` the wrong input channels). Labels
that are NaN or masked out read as 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bnet.models.ae import AEConfig, AutoEncoder, clean_labels
from bnet.models.registry import register
from bnet.models.vae import VAE, VAEConfig


@dataclass
class ConditionalConfig(AEConfig):
    """A ``cond-ae``.

    Attributes:
        conditional_encoder: the encoder reads the labels too.
    """

    conditional_encoder: bool = False


@dataclass
class ConditionalVAEConfig(ConditionalConfig, VAEConfig):
    """A ``cond-vae``: a conditional model's and a VAE's hyperparameters."""


class LabelConditioned:
    """The decoder input of conditional classes: latents, then labels."""

    uses_labels = True

    @property
    def n_encoder_extra_inputs(self) -> int:
        return self.config.n_labels if self.config.conditional_encoder else 0

    @property
    def n_decoder_inputs(self) -> int:
        return self.n_latents + self.config.n_labels

    def decoder_inputs(self, latents: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([latents, clean_labels(batch).to(latents.dtype)], 1)


@register("cond-ae", family="ae", config_type=ConditionalConfig)
class ConditionalAE(LabelConditioned, AutoEncoder):
    """Pixel MSE, as ``ae``."""


@register("cond-vae", family="ae", config_type=ConditionalVAEConfig)
class ConditionalVAE(LabelConditioned, VAE):
    """The ELBO with ``vae.beta``, as ``vae``."""
