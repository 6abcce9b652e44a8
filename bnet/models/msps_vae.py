"""The multi-session PS-VAE (``msps-vae``): a PS-VAE with ``n_background`` more latents
that take what differs between sessions (lighting, camera placement, the animal's build).

Its training batches mix ``n_sessions_per_batch`` sessions; a triplet loss weighted by
``ps_vae.delta`` on the background latents' posterior means pulls each frame towards
another frame of its session and away from a frame of another session, so session identity
lives in the background subspace and not in the unsupervised one. The background latents
carry no KL term (BehaveNet's choice). Single-session batches (validation, test) have no
triplet term, so the validation loss compares across epochs.

BehaveNet cut each session's frames into equal chunks and paired them chunk by chunk, with
extra pull terms; bnet draws for every frame a random positive from its session and a
random negative from another, with torch's ``TripletMarginLoss`` (margin 1) on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bnet.errors import ConfigError
from bnet.models.ae import loss_weight
from bnet.models.ae_losses import session_triplets, triplet_loss
from bnet.models.ps_vae import PSVAE, PSVAEConfig
from bnet.models.registry import register

SESSIONS_PER_BATCH = (2, 3, 4)


@dataclass
class MSPSVAEConfig(PSVAEConfig):
    """A ``msps-vae``.

    Attributes:
        ps_vae_delta (``ps_vae.delta``): weight of the triplet loss.
        n_background: background latents (what differs between sessions), at least 1.
        n_sessions_per_batch: sessions each training batch mixes (2-4).
    """

    ps_vae_delta: float = loss_weight("ps_vae.delta")
    n_background: int = 0
    n_sessions_per_batch: int = 1


@register("msps-vae", family="ae", config_type=MSPSVAEConfig)
class MSPSVAE(PSVAE):
    @property
    def n_background(self) -> int:
        return self.config.n_background

    @classmethod
    def sessions_per_batch(cls, config: MSPSVAEConfig) -> int:
        return config.n_sessions_per_batch

    def check_config(self, config: MSPSVAEConfig) -> None:
        if config.n_sessions < 2:
            raise ConfigError("msps-vae separates sessions: fit it to several (sessions_csv or 'all')")
        if config.n_background < 1:
            raise ConfigError(f"msps-vae needs n_background of at least 1, got {config.n_background}")
        if config.n_sessions_per_batch not in SESSIONS_PER_BATCH:
            raise ConfigError(f"msps-vae: n_sessions_per_batch must be 2, 3 or 4, got {config.n_sessions_per_batch}")
        super().check_config(config)

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        terms = super().loss_terms(batch)
        session = batch.get("session")
        triplets = None
        if session is not None:
            mean, _ = self.posterior(batch)
            triplets = session_triplets(mean[:, self.latent_groups()["background"]].float(), session)
        if triplets is not None:
            terms["triplet"] = triplet_loss(*triplets)
            terms["loss"] = terms["loss"] + self.config.ps_vae_delta * terms["triplet"]
        return terms
