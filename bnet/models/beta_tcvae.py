"""β-TCVAE (``beta-tcvae``, Chen et al. 2018): the VAE's KL split into index-code mutual
information, total correlation and dimension-wise KL, the total correlation weighted by
``beta_tcvae.beta`` (BehaveNet's weights: 1 on the other two, annealed from 0 alongside β)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bnet.models.ae import AEConfig, anneal, anneal_epochs, loss_weight
from bnet.models.ae_losses import decomposed_kl
from bnet.models.registry import register
from bnet.models.vae import VAE

def tc_weights(beta: float, epochs: int, epoch: int, training: bool) -> tuple[float, float]:
    """(weight of MI and DWKL, weight of TC) at ``epoch``: 1 and ``beta``, both rising from 0
    over ``epochs`` training epochs (BehaveNet's schedule)."""
    return anneal(1.0, epochs, epoch, training), anneal(beta, epochs, epoch, training)


@dataclass
class BetaTCVAEConfig(AEConfig):
    """A ``beta-tcvae``.

    Attributes:
        beta_tcvae_beta (``beta_tcvae.beta``): weight of the total correlation.
        beta_tcvae_beta_anneal_epochs (``beta_tcvae.beta_anneal_epochs``): epochs over which
            the KL terms' weights rise from 0.
    """

    beta_tcvae_beta: float = loss_weight("beta_tcvae.beta")
    beta_tcvae_beta_anneal_epochs: int = anneal_epochs("beta_tcvae.beta_anneal_epochs")


@register("beta-tcvae", family="ae", config_type=BetaTCVAEConfig)
class BetaTCVAE(VAE):
    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mean, logvar = self.posterior(batch)
        mean, logvar = mean.float(), logvar.float()
        z = self.sample(mean, logvar)
        terms = self.frame_terms(batch, z)
        terms.update(decomposed_kl(z, mean, logvar))
        k, beta = tc_weights(self.config.beta_tcvae_beta, self.config.beta_tcvae_beta_anneal_epochs, self.epoch,
                             self.training)
        terms["loss"] = terms["frame_nll"] + k * terms["mi"] + beta * terms["tc"] + k * terms["dwkl"]
        return terms
