"""The partitioned subspace VAE (``ps-vae``, Whiteway et al. 2021).

The latents split into one supervised latent per label and ``n_ae_latents - n_labels``
unsupervised ones. Each supervised latent's posterior mean predicts its label through an
elementwise linear map (BehaveNet's ``DiagLinear``); the unsupervised latents are pushed to
factorise by a β-TCVAE penalty. The loss per frame is

    frame NLL + ps_vae.alpha * label NLL + KL(supervised)
      + k * MI(unsup) + ps_vae.beta * TC(unsup) + k * DWKL(unsup)

with ``k`` and ``ps_vae.beta`` rising from 0 over ``ps_vae.anneal_epochs``. Labels are left
out of the label term where they are NaN or ``labels_masks`` is 0. BehaveNet rotated a free
linear layer's output by a fixed random orthogonal matrix to make the two subspaces; a free
linear layer spans the same maps, so bnet's encoder writes both subspaces directly. The
label readout starts at the training labels' mean and standard deviation (BehaveNet's at
1 x + 0), so labels in pixel units are reachable within a few epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bnet.errors import ConfigError
from bnet.models.ae import EncoderMayReadLabels, LabelReadingConfig, anneal_epochs, loss_weight
from bnet.models.ae_losses import decomposed_kl, gaussian_kl, gaussian_nll, label_mask, masked_mse
from bnet.models.beta_tcvae import tc_weights
from bnet.models.registry import register
from bnet.models.vae import VAE


@dataclass
class PSVAEConfig(LabelReadingConfig):
    """A ``ps-vae``.

    Attributes:
        ps_vae_alpha (``ps_vae.alpha``): weight of the label reconstruction.
        ps_vae_beta (``ps_vae.beta``): weight of the unsupervised latents' total correlation.
        ps_vae_anneal_epochs (``ps_vae.anneal_epochs``): epochs over which the KL terms'
            weights rise from 0.
    """

    ps_vae_alpha: float = loss_weight("ps_vae.alpha")
    ps_vae_beta: float = loss_weight("ps_vae.beta")
    ps_vae_anneal_epochs: int = anneal_epochs("ps_vae.anneal_epochs")


@register("ps-vae", family="ae", config_type=PSVAEConfig)
class PSVAE(EncoderMayReadLabels, VAE):
    uses_labels = True
    @property
    def n_background(self) -> int:
        return 0

    @property
    def n_unsupervised(self) -> int:
        return self.config.n_ae_latents - self.config.n_labels - self.n_background

    def check_config(self, config: PSVAEConfig) -> None:
        super().check_config(config)
        if self.n_unsupervised < 1:
            raise ConfigError(
                f"{config.model_class}: n_ae_latents ({config.n_ae_latents}) must exceed the {config.n_labels} "
                f"supervised latents (one per label)" + (f" plus n_background ({self.n_background})"
                                                        if self.n_background else ""))

    def build_heads(self) -> None:
        n = self.config.n_labels
        self.label_scale = nn.Parameter(torch.ones(n))
        self.label_offset = nn.Parameter(torch.zeros(n))

    def latent_groups(self) -> dict[str, slice]:
        """Where each subspace sits in the latents ``encode`` returns."""
        s, b = self.config.n_labels, self.n_background
        groups = {"supervised": slice(0, s), "background": slice(s, s + b), "unsupervised": slice(s + b, None)}
        return {k: v for k, v in groups.items() if k != "background" or b}

    @torch.no_grad()
    def initialize_label_readout(self, labels: torch.Tensor, mask: torch.Tensor) -> None:
        """Start the readout at the training labels' mean and spread, so supervised latents
        start on the scale of N(0, 1) (labels in pixels are tens to hundreds; a readout
        starting at 1 x + 0 spends hundreds of Adam steps on the offset alone)."""
        weight = mask.sum(0).clamp_min(1.0)
        mean = (torch.nan_to_num(labels) * mask).sum(0) / weight
        std = (((torch.nan_to_num(labels) - mean) ** 2 * mask).sum(0) / weight).sqrt().clamp_min(1e-3)
        self.label_offset.copy_(mean)
        self.label_scale.copy_(std)

    def predict_labels(self, latents: torch.Tensor) -> torch.Tensor:
        return latents[:, : self.config.n_labels] * self.label_scale + self.label_offset

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mean, logvar = self.posterior(batch)
        mean, logvar = mean.float(), logvar.float()
        z = self.sample(mean, logvar)
        terms = self.frame_terms(batch, z)
        groups = self.latent_groups()
        labels = batch["labels"]
        mask = label_mask(labels, batch.get("labels_masks"))
        predicted = self.predict_labels(mean)
        terms["label_nll"] = gaussian_nll(predicted, labels, mask)
        terms["label_mse"] = masked_mse(predicted, labels, mask)
        supervised, unsupervised = groups["supervised"], groups["unsupervised"]
        terms["kl_supervised"] = gaussian_kl(mean[:, supervised], logvar[:, supervised])
        terms.update(decomposed_kl(z[:, unsupervised], mean[:, unsupervised], logvar[:, unsupervised]))
        config = self.config
        k, beta = tc_weights(config.ps_vae_beta, config.ps_vae_anneal_epochs, self.epoch, self.training)
        terms["loss"] = (terms["frame_nll"] + config.ps_vae_alpha * terms["label_nll"] + terms["kl_supervised"]
                         + k * terms["mi"] + beta * terms["tc"] + k * terms["dwkl"])
        return terms
