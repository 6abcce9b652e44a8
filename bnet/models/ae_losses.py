"""Loss terms of the autoencoder family, each a closed form the tests check on small inputs.

Conventions (where BehaveNet's code was inconsistent, bnet picks one and tests it):

* A Gaussian posterior is ``(mean, logvar)`` with ``logvar = log sigma**2``: the
  reparameterised sample is ``mean + exp(logvar / 2) * eps`` and every density uses
  ``exp(logvar)`` as the variance. BehaveNet's sampler used ``exp(logvar)`` as the standard
  deviation while its KL and density terms used it as the variance, so its samples were
  drawn from a posterior other than the one its KL penalised.
* Every term is a mean over frames, so terms of batches of different sizes average
  frame-weighted. Squared errors (``masked_mse``) are also means over pixels or label
  dimensions; Gaussian negative log-likelihoods (``gaussian_nll``, unit variance, the
  reconstruction terms of the variational classes as in BehaveNet) are sums over them, so
  that the KL terms weigh against the whole frame as in the ELBO.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

LOG_2PI = math.log(2 * math.pi)


def reparameterize(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """A sample of ``N(mean, exp(logvar))``: the standard deviation is ``exp(logvar / 2)``."""
    return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise ``log N(x; mean, exp(logvar))``."""
    return -0.5 * (LOG_2PI + logvar + (x - mean) ** 2 * torch.exp(-logvar))


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mean, exp(logvar)) || N(0, I))`` summed over latents, averaged over frames."""
    return 0.5 * (mean**2 + torch.exp(logvar) - logvar - 1.0).sum(-1).mean()


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over the entries the mask keeps (all entries without a mask)."""
    squared = (prediction - torch.nan_to_num(target)) ** 2
    if mask is None:
        return squared.mean()
    return (squared * mask).sum() / mask.sum().clamp_min(1.0)


def gaussian_nll(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``-log N(target; prediction, I)`` over the kept entries of each frame, averaged over
    frames (unit variance: BehaveNet's ``gaussian_ll`` with std 1)."""
    keep = torch.ones_like(target) if mask is None else mask
    per_frame = 0.5 * (((prediction - torch.nan_to_num(target)) ** 2) * keep).flatten(1).sum(1)
    per_frame = per_frame + 0.5 * LOG_2PI * keep.flatten(1).sum(1)
    return per_frame.mean()


def label_mask(labels: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
    """1 where a label is observed: its ``labels_masks`` entry is non-zero and it is not NaN."""
    observed = torch.isfinite(labels).to(labels.dtype)
    return observed if masks is None else observed * (masks != 0).to(labels.dtype)


def decomposed_kl(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> dict[str, torch.Tensor]:
    """The KL term split into index-code mutual information, total correlation and
    dimension-wise KL (Chen et al. 2018), estimated on the batch.

    ``z`` are samples of ``q(z | x_i)`` for the batch's frames; the aggregate posterior
    ``q(z)`` and its marginals are the mixture of the batch's posteriors. The three terms sum
    exactly to the batch's sample estimate of ``E_x KL(q(z|x) || p(z))`` and are all 0 when
    every posterior is the prior. (Minibatch-weighted sampling, which weighs the mixture as
    if drawn from the whole training set, adds log(training frames) to MI and subtracts it
    per dimension from DWKL, constants without gradient; BehaveNet dropped them instead,
    so its reported MI and DWKL were offset by log(batch size).)
    Returns ``{"mi", "tc", "dwkl"}``, each averaged over frames.
    """
    log_norm = math.log(z.shape[0])
    # pairwise[i, j, d] = log q(z_i[d] | x_j)
    pairwise = gaussian_log_density(z.unsqueeze(1), mean.unsqueeze(0), logvar.unsqueeze(0))
    log_q_z_given_x = gaussian_log_density(z, mean, logvar).sum(-1)
    log_q_z = torch.logsumexp(pairwise.sum(-1), dim=1) - log_norm
    log_prod_q_zd = (torch.logsumexp(pairwise, dim=1) - log_norm).sum(-1)
    log_p_z = gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z)).sum(-1)
    return {"mi": (log_q_z_given_x - log_q_z).mean(),
            "tc": (log_q_z - log_prod_q_zd).mean(),
            "dwkl": (log_prod_q_zd - log_p_z).mean()}


def triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                 margin: float = 1.0) -> torch.Tensor:
    """``mean(max(0, |a - p| - |a - n| + margin))`` with Euclidean distances (torch's
    ``TripletMarginLoss``, BehaveNet's choice)."""
    return F.relu((anchor - positive).norm(dim=-1) - (anchor - negative).norm(dim=-1) + margin).mean()


def session_triplets(latents: torch.Tensor, sessions: torch.Tensor,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...] | None:
    """(anchor, positive, negative) rows for a triplet loss across sessions: each anchor
    frame paired with another frame of its session and a frame of another session.

    None when the batch holds fewer than two sessions (no negatives exist).
    """
    present = torch.unique(sessions)
    if present.numel() < 2:
        return None
    n = latents.shape[0]
    same = sessions.unsqueeze(0) == sessions.unsqueeze(1)
    noise = torch.rand((n, n), generator=generator, device=latents.device)
    # a random frame of the same session (not the anchor itself where another exists)
    others = same & ~torch.eye(n, dtype=torch.bool, device=latents.device)
    has_other = others.any(1)
    positive_pool = torch.where(has_other.unsqueeze(1), others, same)
    positive = torch.where(positive_pool, noise, -1.0).argmax(1)
    negative = torch.where(~same, noise, -1.0).argmax(1)
    return latents, latents[positive], latents[negative]


def r2_score(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Coefficient of determination per dimension over the observed entries, averaged over
    dimensions (each dimension's variance about its own mean, as scikit-learn computes it)."""
    weight = mask.sum(0).clamp_min(1.0)
    target = torch.nan_to_num(target)
    mean = (target * mask).sum(0) / weight
    residual = (((prediction - target) ** 2) * mask).sum(0)
    total = (((target - mean) ** 2) * mask).sum(0).clamp_min(1e-12)
    return (1.0 - residual / total).mean()


def mean_abs_correlation(latents: torch.Tensor) -> torch.Tensor:
    """Mean absolute Pearson correlation over pairs of latent dimensions (0 for one dimension):
    the PS-VAE guide's check that the unsupervised latents are disentangled."""
    if latents.shape[1] < 2:
        return latents.new_zeros(())
    corr = torch.corrcoef(latents.T)
    upper = torch.triu_indices(corr.shape[0], corr.shape[1], offset=1)
    return torch.nan_to_num(corr[upper[0], upper[1]]).abs().mean()
