"""The variational autoencoder (``vae``): a Gaussian posterior per frame, the ELBO's
unit-variance Gaussian reconstruction term plus ``vae.beta`` times the KL to N(0, I)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bnet.models.ae import AEConfig, AutoEncoder, anneal, anneal_epochs, loss_weight
from bnet.models.ae_losses import gaussian_kl, gaussian_nll, reparameterize
from bnet.models.registry import register


@dataclass
class VAEConfig(AEConfig):
    """A ``vae`` (or ``cond-vae``).

    Attributes:
        vae_beta (``vae.beta``): weight of the KL term.
        vae_beta_anneal_epochs (``vae.beta_anneal_epochs``): epochs over which that weight
            rises linearly from 0 (0: no annealing).
    """

    vae_beta: float = loss_weight("vae.beta")
    vae_beta_anneal_epochs: int = anneal_epochs("vae.beta_anneal_epochs")


@register("vae", family="ae", config_type=VAEConfig)
class VAE(AutoEncoder):
    """``encode`` returns posterior means; training decodes reparameterised samples
    (standard deviation ``exp(logvar / 2)``), evaluation decodes the means' samples too, so
    the validation loss is the (negative) ELBO it is trained on."""

    variational = True

    def sample(self, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        return reparameterize(mean, logvar)

    def frame_terms(self, batch: dict[str, torch.Tensor], z: torch.Tensor) -> dict[str, torch.Tensor]:
        """The reconstruction's negative log-likelihood and pixel MSE from latents ``z``."""
        reconstruction = self.reconstruct(batch, z).float()
        return {"frame_nll": gaussian_nll(reconstruction, batch["images"], batch.get("masks")),
                "pixel_mse": self.pixel_mse(batch, reconstruction)}

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mean, logvar = self.posterior(batch)
        mean, logvar = mean.float(), logvar.float()
        terms = self.frame_terms(batch, self.sample(mean, logvar))
        terms["kl"] = gaussian_kl(mean, logvar)
        beta = anneal(self.config.vae_beta, self.config.vae_beta_anneal_epochs, self.epoch, self.training)
        terms["loss"] = terms["frame_nll"] + beta * terms["kl"]
        return terms
