"""β-TCVAE (``beta-tcvae``, Chen et al. 2018): the VAE's KL split into index-code mutual
information, total correlation and dimension-wise KL, the total correlation weighted by
``beta_tcvae.beta`` (BehaveNet's weights: 1 on the other two, annealed from 0 alongside β)."""

from __future__ import annotations

import torch

from bnet.models.ae import AEConfig, anneal
from bnet.models.ae_losses import decomposed_kl
from bnet.models.registry import register
from bnet.models.vae import VAE

def tc_weights(beta: float, epochs: int, epoch: int, training: bool) -> tuple[float, float]:
    """(weight of MI and DWKL, weight of TC) at ``epoch``: 1 and ``beta``, both rising from 0
    over ``epochs`` training epochs (BehaveNet's schedule)."""
    return anneal(1.0, epochs, epoch, training), anneal(beta, epochs, epoch, training)


@register("beta-tcvae", family="ae", config_type=AEConfig)
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
