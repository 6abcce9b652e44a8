"""Bayesian decoding of behaviour from neural activity: an ARHMM prior over the latents combined
with discriminative decoders by Bayes' rule (the scheme BehaveNet's authors described and never
released).

Generative picture: states z_t follow the ARHMM's transition matrix P; latents follow
x_t ~ N(A_{z_t} [x_{t-1}; ...; x_{t-L}] + b_{z_t}, Q_{z_t}), written as a linear dynamical system
over the companion state s_t = [x_t; ...; x_{t-L+1}]. The neural likelihood is not fitted:
p(n_t | x_t, z_t) is taken proportional to q(x_t | n) q(z_t | n) / (p_inf(x_t) p_inf(z_t)), the
trained decoders' predictions divided by the prior marginals. Inference, per sample s:

1. a state path z^(s) by forward filtering, backward sampling in the HMM with initial
   distribution p_inf(z) (P's stationary distribution), transitions P and potentials
   log q(z_t | n) - log p_inf(z_t) (:func:`sample_state_paths`);
2. the prior marginals of x_t given z^(s) (a Kalman filter with no observations), their
   variances scaled by ``scale`` (c) (:func:`prior_marginals`);
3. the decoder's Gaussian divided by that prior, per dimension, as a pseudo-observation; where
   the decoder's variance is not below the scaled prior's it is clamped just below it, and
   counted (:func:`pseudo_observations`);
4. a Kalman smoother over the pseudo-observations: E[x | z^(s), n] and one draw
   (:func:`smooth`).

Everything is batched over trials (and samples) in torch, CPU or CUDA, float64 by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from bnet.config import FILLED
from bnet.errors import ConfigError
from bnet.models.arhmm.messages import forward_backward, viterbi
from bnet.models.registry import build_model, config_from_dict, register
from bnet.models.serving import ServingSpec, decoder_example, decoder_input_size, register_serving

CLAMP = 0.99
"""A clamped decoder variance is this fraction of the scaled prior's variance."""
MIN_STATE_PROBABILITY = 1e-8
"""The floor of a state's stationary probability: a state the chain (almost) never reaches
would otherwise get a potential of hundreds of nats from any decoder probability."""


# --- randomness ----------------------------------------------------------------------------

Randomness = torch.Generator | list[torch.Generator] | None
"""One generator for a whole batch, or one per sequence (whose draws are then its own)."""


def _draws(kind: str, shape: tuple[int, ...], generator, like: torch.Tensor, sequence_axis: int) -> torch.Tensor:
    """Uniform or standard normal draws of ``shape``; with one generator per sequence (a list),
    each sequence's slice along ``sequence_axis`` comes from its own generator, so a sequence's
    draws do not depend on which sequences share its batch."""
    draw = torch.rand if kind == "uniform" else torch.randn
    if not isinstance(generator, list):
        return draw(shape, generator=generator, dtype=like.dtype, device=like.device)
    one = shape[:sequence_axis] + shape[sequence_axis + 1:]
    return torch.stack([draw(one, generator=g, dtype=like.dtype, device=like.device) for g in generator],
                       sequence_axis)


# --- the discrete states ------------------------------------------------------------------

def stationary_distribution(log_P: torch.Tensor) -> torch.Tensor:
    """(K,) the stationary distribution of the row-stochastic ``exp(log_P)`` (the left
    eigenvector of eigenvalue 1, found by solving (P^T - I) pi = 0 with sum(pi) = 1)."""
    P = log_P.exp()
    k = P.shape[0]
    system = torch.cat([(P.T - torch.eye(k, dtype=P.dtype, device=P.device)), torch.ones(1, k, dtype=P.dtype,
                                                                                      device=P.device)])
    target = torch.zeros(k + 1, dtype=P.dtype, device=P.device)
    target[-1] = 1
    pi = torch.linalg.lstsq(system, target.unsqueeze(-1)).solution.squeeze(-1)
    return pi.clamp_min(0) / pi.clamp_min(0).sum()


def sample_state_paths(log_pi0: torch.Tensor, log_P: torch.Tensor, potentials: torch.Tensor, n_samples: int,
                       generator: Randomness = None) -> torch.Tensor:
    """(S, N, T) state paths drawn from the HMM posterior by forward filtering, backward sampling.

    Args:
        log_pi0: (K,) log initial distribution.
        log_P: (K, K) log transition matrix, rows summing to 1.
        potentials: (N, T, K) log potentials of each frame's state.
        n_samples: paths per sequence.
        generator: one generator, or one per sequence.
    """
    n_seq, n_steps, k = potentials.shape
    P = log_P.exp()
    # filtered[t] = p(z_t | potentials_0..t), renormalised every step (scaled recursion)
    filtered = torch.empty(n_steps, n_seq, k, dtype=potentials.dtype, device=potentials.device)
    emission = (potentials - potentials.amax(-1, keepdim=True)).exp().transpose(0, 1)
    alpha = emission[0] * log_pi0.exp()
    filtered[0] = alpha / alpha.sum(-1, keepdim=True)
    for t in range(1, n_steps):
        alpha = (filtered[t - 1] @ P) * emission[t]
        filtered[t] = alpha / alpha.sum(-1, keepdim=True)
    uniforms = _draws("uniform", (n_steps, n_samples, n_seq), generator, potentials, 2)
    paths = torch.empty(n_steps, n_samples, n_seq, dtype=torch.long, device=potentials.device)
    weights = filtered[-1].expand(n_samples, n_seq, k)
    paths[-1] = _draw(weights, uniforms[-1])
    for t in range(n_steps - 2, -1, -1):
        # p(z_t | z_t+1, potentials_0..t) is proportional to filtered[t] * P[:, z_t+1]
        weights = filtered[t] * P.T[paths[t + 1]]
        paths[t] = _draw(weights, uniforms[t])
    return paths.permute(1, 2, 0).contiguous()


def _draw(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One category per row of unnormalised ``weights`` (..., K), by inverting the cumulative
    distribution at ``uniforms`` (...)."""
    cumulative = weights.cumsum(-1)
    chosen = torch.searchsorted(cumulative, (uniforms * cumulative[..., -1]).unsqueeze(-1))
    return chosen.squeeze(-1).clamp_max(weights.shape[-1] - 1)


class StatePosterior(NamedTuple):
    probabilities: torch.Tensor
    """(N, T, K) p(z_t | n) in the HMM with the decoder's potentials."""
    viterbi: torch.Tensor
    """(N, T) the most likely path."""


def state_posterior(log_pi0: torch.Tensor, log_P: torch.Tensor, potentials: torch.Tensor) -> StatePosterior:
    time_major = potentials.permute(2, 1, 0)
    mask = torch.ones(time_major.shape[1:], dtype=torch.bool, device=potentials.device)
    probabilities = forward_backward(log_pi0, log_P, time_major, mask).expected_states.permute(2, 1, 0)
    return StatePosterior(probabilities, viterbi(log_pi0, log_P, time_major, mask))


# --- the latents given a state path -------------------------------------------------------

@dataclass(frozen=True)
class SwitchingDynamics:
    """The ARHMM's continuous part as a linear dynamical system per state, over the companion
    state s_t = [x_t; x_{t-1}; ...; x_{t-L+1}] (an HMM, L = 0, has s_t = x_t and no dynamics).

    Attributes:
        transition: (K, M, M) F_k.
        offset: (K, M) g_k.
        noise: (K, M, M) W_k (Q_k in the top-left block, 0 elsewhere).
        initial_mean: (M,) the prior mean of s_0 (with lags; an HMM's x_0 comes from its state).
        initial_cov: (M, M) its covariance.
        n_dims: D, the latents' dimensions (the first D of the companion state).
        n_lags: L.
    """

    transition: torch.Tensor
    offset: torch.Tensor
    noise: torch.Tensor
    initial_mean: torch.Tensor
    initial_cov: torch.Tensor
    n_dims: int
    n_lags: int

    def starts_at(self, t: int) -> bool:
        """Whether step t is predicted from the one before (every step of an HMM: its frames
        are drawn from their state alone, the first too)."""
        return t > 0 or self.n_lags == 0

    @classmethod
    def from_arhmm(cls, As: torch.Tensor, bs: torch.Tensor, Sigmas: torch.Tensor, initial_mean: torch.Tensor,
                   initial_cov: torch.Tensor) -> "SwitchingDynamics":
        """From ssm's parameters: As (K, D, D*L), bs (K, D), Sigmas (K, D, D); the initial
        moments are those of one frame (D,), (D, D), repeated over the L frames of s_0."""
        k, d = bs.shape
        lags = As.shape[2] // d
        size = d * max(lags, 1)
        like = {"dtype": bs.dtype, "device": bs.device}
        transition = torch.zeros(k, size, size, **like)
        if lags:
            transition[:, :d] = As
            transition[:, d:, : size - d] = torch.eye(size - d, **like)
        offset = torch.zeros(k, size, **like)
        offset[:, :d] = bs
        noise = torch.zeros(k, size, size, **like)
        noise[:, :d, :d] = Sigmas
        repeats = max(lags, 1)
        return cls(transition, offset, noise, initial_mean.repeat(repeats),
                   torch.block_diag(*[initial_cov] * repeats), d, lags)


def _states_at(values: torch.Tensor, paths: torch.Tensor, t: int) -> torch.Tensor:
    """``values[k]`` per sequence for its state at step t: (B, ...) from (K, ...) and paths (B, T)."""
    return values[paths[:, t]]


def prior_marginals(dynamics: SwitchingDynamics, paths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, D) means and variances of x_t given the state path alone (a Kalman filter with no
    observations): the prior the decoder's Gaussian is divided by."""
    n_seq, n_steps = paths.shape
    d = dynamics.n_dims
    mean = dynamics.initial_mean.expand(n_seq, -1)
    cov = dynamics.initial_cov.expand(n_seq, -1, -1)
    means = torch.empty(n_seq, n_steps, d, dtype=mean.dtype, device=mean.device)
    variances = torch.empty_like(means)
    for t in range(n_steps):
        if dynamics.starts_at(t):
            mean, cov = _predict(dynamics, paths, t, mean, cov)
        means[:, t] = mean[:, :d]
        variances[:, t] = cov[:, :d, :d].diagonal(dim1=-2, dim2=-1)
    return means, variances


def _predict(dynamics, paths, t, mean, cov):
    F = _states_at(dynamics.transition, paths, t)
    mean = (F @ mean.unsqueeze(-1)).squeeze(-1) + _states_at(dynamics.offset, paths, t)
    cov = F @ cov @ F.transpose(-1, -2) + _states_at(dynamics.noise, paths, t)
    return mean, 0.5 * (cov + cov.transpose(-1, -2))


class PseudoObservations(NamedTuple):
    values: torch.Tensor
    """(B, T, D) pseudo-observation means."""
    variances: torch.Tensor
    """(B, T, D) their variances."""
    clamped: torch.Tensor
    """(B, T, D) True where the decoder's variance was clamped below the scaled prior's."""


def pseudo_observations(decoder_mean: torch.Tensor, decoder_var: torch.Tensor, prior_mean: torch.Tensor,
                        prior_var: torch.Tensor, scale: float) -> PseudoObservations:
    """The decoder's Gaussian N(decoder_mean, decoder_var) divided by the scaled prior
    N(prior_mean, scale * prior_var), per dimension: a Gaussian likelihood of x_t."""
    tiny = torch.finfo(decoder_mean.dtype).eps
    # a dimension constant in training (zero variance) still gets a (sharp) Gaussian
    scaled = scale * prior_var.clamp_min(tiny)
    decoder_var = decoder_var.clamp_min(tiny).expand_as(decoder_mean)
    clamped = decoder_var >= scaled
    variance = torch.where(clamped, CLAMP * scaled, decoder_var)
    precision = 1 / variance - 1 / scaled
    values = (decoder_mean / variance - prior_mean / scaled) / precision
    return PseudoObservations(values, 1 / precision, clamped)


class Smoothed(NamedTuple):
    means: torch.Tensor
    """(B, T, D) E[x_t | z, observations]."""
    variances: torch.Tensor
    """(B, T, D) Var[x_t | z, observations] per dimension."""
    samples: torch.Tensor | None
    """(B, T, D) one draw of the latents from the same posterior, or None."""


def smooth(dynamics: SwitchingDynamics, paths: torch.Tensor, observations: torch.Tensor,
           variances: torch.Tensor, generator: Randomness = None, sample: bool = True) -> Smoothed:
    """Kalman filter and Rauch-Tung-Striebel smoother of x given a state path and Gaussian
    observations ``observations`` (B, T, D) of x_t with diagonal ``variances`` (B, T, D); with
    ``sample``, one draw by backward sampling (``generator``: one, or one per sequence)."""
    n_seq, n_steps = paths.shape
    d = dynamics.n_dims
    size = dynamics.initial_mean.shape[0]
    eye = torch.eye(size, dtype=observations.dtype, device=observations.device)
    filtered_means, filtered_covs, predicted_means, predicted_covs = [], [], [], []
    mean = dynamics.initial_mean.expand(n_seq, -1)
    cov = dynamics.initial_cov.expand(n_seq, -1, -1)
    for t in range(n_steps):
        if dynamics.starts_at(t):
            mean, cov = _predict(dynamics, paths, t, mean, cov)
        predicted_means.append(mean)
        predicted_covs.append(cov)
        # update on y_t = H s_t + e, H selecting the first D entries, e ~ N(0, diag(variances))
        innovation_cov = cov[:, :d, :d] + torch.diag_embed(variances[:, t])
        gain = torch.linalg.solve(innovation_cov, cov[:, :d, :]).transpose(-1, -2)  # (B, M, D)
        mean = mean + (gain @ (observations[:, t] - mean[:, :d]).unsqueeze(-1)).squeeze(-1)
        keep = eye.clone().expand(n_seq, -1, -1).clone()
        keep[:, :, :d] -= gain
        # Joseph form: stays symmetric and positive definite where the observation is sharp
        cov = keep @ cov @ keep.transpose(-1, -2) + gain @ torch.diag_embed(variances[:, t]) @ gain.transpose(-1, -2)
        filtered_means.append(mean)
        filtered_covs.append(cov)

    means, covs = [None] * n_steps, [None] * n_steps
    means[-1], covs[-1] = filtered_means[-1], filtered_covs[-1]
    draws = [None] * n_steps if sample else None
    if sample:
        normals = _draws("normal", (n_steps, n_seq, size), generator, observations, 1)
        draws[-1] = _gaussian(filtered_means[-1], filtered_covs[-1], normals[-1])
    for t in range(n_steps - 2, -1, -1):
        F = _states_at(dynamics.transition, paths, t + 1)
        # J = P_t|t F^T P_t+1|t^-1
        smoother_gain = torch.linalg.solve(predicted_covs[t + 1], F @ filtered_covs[t]).transpose(-1, -2)
        means[t] = filtered_means[t] + (smoother_gain @ (means[t + 1] - predicted_means[t + 1]).unsqueeze(-1)).squeeze(-1)
        covs[t] = filtered_covs[t] + smoother_gain @ (covs[t + 1] - predicted_covs[t + 1]) @ smoother_gain.transpose(-1, -2)
        if sample:
            conditional_mean = filtered_means[t] + (smoother_gain @ (draws[t + 1] - predicted_means[t + 1])
                                                    .unsqueeze(-1)).squeeze(-1)
            conditional_cov = filtered_covs[t] - smoother_gain @ predicted_covs[t + 1] @ smoother_gain.transpose(-1, -2)
            draws[t] = _gaussian(conditional_mean, conditional_cov, normals[t])
    variances = torch.stack([c[:, :d, :d].diagonal(dim1=-2, dim2=-1) for c in covs], 1)
    return Smoothed(torch.stack(means, 1)[:, :, :d], variances, torch.stack(draws, 1)[:, :, :d] if sample else None)


def _gaussian(mean: torch.Tensor, cov: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
    """A draw from N(mean, cov) per row from standard ``normals``; the companion state's copied
    lags make cov singular, so the factor is an eigendecomposition with negative rounding clipped."""
    values, vectors = torch.linalg.eigh(0.5 * (cov + cov.transpose(-1, -2)))
    factor = vectors * values.clamp_min(0).sqrt().unsqueeze(-2)
    return mean + (factor @ normals.unsqueeze(-1)).squeeze(-1)


# --- the whole scheme ---------------------------------------------------------------------

class Posterior(NamedTuple):
    mean: torch.Tensor
    """(N, T, D) posterior mean of the latents (over the sampled state paths)."""
    spread: torch.Tensor
    """(N, T, D) posterior standard deviation: within each path's Gaussian and between paths."""
    samples: torch.Tensor
    """(S, N, T, D) one latent draw per sampled state path."""
    state_probabilities: torch.Tensor
    """(N, T, K) p(z_t | n)."""
    viterbi: torch.Tensor
    """(N, T) the most likely state path."""
    clamped_fraction: torch.Tensor
    """(N,) per trial, the share of (path, frame, dimension) where the decoder's variance was clamped."""


@dataclass(frozen=True)
class ARHMMPrior:
    """What the Bayesian decoder takes from an ARHMM: its transition matrix (log), the
    stationary distribution of its states, and its dynamics."""

    log_P: torch.Tensor
    log_p_inf: torch.Tensor
    dynamics: SwitchingDynamics

    @classmethod
    def from_engine(cls, engine, initial_mean: torch.Tensor, initial_cov: torch.Tensor) -> "ARHMMPrior":
        """From a fitted :class:`bnet.models.arhmm.ARHMM` with stationary or sticky transitions
        and Gaussian noise; ``initial_*`` are the moments of one frame of the training latents."""
        config, p = engine.config, engine.parameters
        if config.transitions not in ("stationary", "sticky"):
            raise ConfigError(f"the Bayesian decoder needs an ARHMM with stationary or sticky transitions, not "
                              f"{config.transitions} (its states would depend on the latents)")
        if config.noise_type not in ("gaussian", "diagonal_gaussian"):
            raise ConfigError(f"the Bayesian decoder needs Gaussian ARHMM noise, not {config.noise_type}")
        # float64 whatever the engine ran in: the smoother's covariances span many orders of magnitude
        log_P = torch.log_softmax(p.log_Ps.double(), dim=-1)
        pi = stationary_distribution(log_P).clamp_min(MIN_STATE_PROBABILITY)
        dynamics = SwitchingDynamics.from_arhmm(p.As.double(), p.bs.double(), p.Sigmas.double(),
                                                initial_mean.to(p.bs).double(), initial_cov.to(p.bs).double())
        return cls(log_P, (pi / pi.sum()).log(), dynamics)


def state_potentials(prior: ARHMMPrior, state_probs: torch.Tensor, scale: float, n_samples: int) -> torch.Tensor:
    """(N, T, K) log q(z | n) - log p(z), after checking the scale and sample count both
    inference methods take."""
    if scale < 1 or n_samples < 1:
        raise ConfigError(f"the Bayesian decoder needs a prior scale of at least 1 and at least 1 sample, got "
                          f"{scale} and {n_samples}")
    return state_probs.clamp_min(torch.finfo(state_probs.dtype).tiny).log() - prior.log_p_inf


def decode(prior: ARHMMPrior, decoder_mean: torch.Tensor, decoder_var: torch.Tensor, state_probs: torch.Tensor,
           scale: float, n_samples: int, generator: Randomness = None) -> Posterior:
    """The posterior over latents and states of N trials of T frames.

    Args:
        prior: the ARHMM's prior.
        decoder_mean: (N, T, D) the latent decoder's predictions.
        decoder_var: (D,) its error variance per dimension (on the validation trials).
        state_probs: (N, T, K) the state decoder's probabilities.
        scale: c >= 1, the factor on the prior marginals' variances (below 1 the prior divided
            out would be sharper than the prior the smoother puts back).
        n_samples: S, state paths sampled per trial.
        generator: one generator, or one per trial (each trial's draws are then its own,
            whatever else is decoded with it).
    """
    potentials = state_potentials(prior, state_probs, scale, n_samples)
    n_seq, n_steps, d = decoder_mean.shape
    paths = sample_state_paths(prior.log_p_inf, prior.log_P, potentials, n_samples, generator)
    flat_paths = paths.reshape(n_samples * n_seq, n_steps)
    prior_mean, prior_var = prior_marginals(prior.dynamics, flat_paths)
    repeated = decoder_mean.repeat(n_samples, 1, 1)
    pseudo = pseudo_observations(repeated, decoder_var, prior_mean, prior_var, scale)
    # the smoother's sequences are (sample, trial) pairs, sample-major: trial n's generator serves
    # sequences n, N + n, 2N + n, ...
    per_sequence = generator * n_samples if isinstance(generator, list) else generator
    smoothed = smooth(prior.dynamics, flat_paths, pseudo.values, pseudo.variances, per_sequence)
    means = smoothed.means.reshape(n_samples, n_seq, n_steps, d)
    within = smoothed.variances.reshape(n_samples, n_seq, n_steps, d).mean(0)
    between = means.var(0, unbiased=False)
    states = state_posterior(prior.log_p_inf, prior.log_P, potentials)
    clamped = pseudo.clamped.reshape(n_samples, n_seq, n_steps, d).double().mean((0, 2, 3))
    return Posterior(means.mean(0), (within + between).sqrt(), smoothed.samples.reshape(n_samples, n_seq, n_steps, d),
                     states.probabilities, states.viterbi, clamped)


GIBBS_BURN_IN = 20
"""Gibbs sweeps dropped before the kept ones (the chain starts from a path drawn as the default
scheme draws its first)."""


def ar_log_likelihoods(dynamics: SwitchingDynamics, latents: torch.Tensor) -> torch.Tensor:
    """(N, T, K) log N(x_t; A_k [x_t-1 .. x_t-L] + b_k, Q_k); 0 for the first L frames, whose
    prior does not depend on the state."""
    n_seq, n_steps, d = latents.shape
    lags = dynamics.n_lags
    lagged = torch.cat([torch.nn.functional.pad(latents[:, : n_steps - lag], (0, 0, lag, 0))
                        for lag in range(1, lags + 1)], -1) if lags else latents.new_zeros(n_seq, n_steps, 0)
    weights = dynamics.transition[:, :d, : d * lags]  # (K, D, D*L)
    predicted = torch.einsum("kdj,ntj->ntkd", weights, lagged) + dynamics.offset[:, :d]
    residual = latents.unsqueeze(2) - predicted  # (N, T, K, D)
    chol = torch.linalg.cholesky(dynamics.noise[:, :d, :d])
    solved = torch.linalg.solve_triangular(chol, residual.unsqueeze(-1), upper=False).squeeze(-1)
    log_det = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    log_likes = -0.5 * (solved.pow(2).sum(-1) + log_det + d * torch.log(torch.tensor(2 * torch.pi, dtype=latents.dtype)))
    log_likes[:, :lags] = 0
    return log_likes


def gibbs(prior: ARHMMPrior, decoder_mean: torch.Tensor, decoder_var: torch.Tensor, state_probs: torch.Tensor,
          scale: float, n_samples: int, generator: Randomness = None, burn_in: int = GIBBS_BURN_IN) -> Posterior:
    """The same posterior by Gibbs sampling over (z, x) of the switching linear dynamical system
    (slower; a cross-check of :func:`decode`). The decoder's Gaussian is divided by the latents'
    stationary marginal (the training moments, variances scaled by c), so the pseudo-observations
    do not depend on the path; each sweep draws x given z (the Kalman smoother) and z given x
    (forward filtering, backward sampling with the ARHMM's own likelihood of x beside the state
    decoder's potentials). After ``burn_in`` sweeps, ``n_samples`` are kept: the mean averages
    each kept path's smoothed mean, the states are the kept paths' frequencies (``viterbi`` is
    the most frequent state per frame)."""
    potentials = state_potentials(prior, state_probs, scale, n_samples)
    n_seq, n_steps, d = decoder_mean.shape
    dynamics = prior.dynamics
    stationary_mean = dynamics.initial_mean[:d].expand(n_seq, n_steps, d)
    stationary_var = dynamics.initial_cov[:d, :d].diagonal().expand(n_seq, n_steps, d)
    pseudo = pseudo_observations(decoder_mean, decoder_var, stationary_mean, stationary_var, scale)
    paths = sample_state_paths(prior.log_p_inf, prior.log_P, potentials, 1, generator)[0]
    means, variances, draws, kept_paths = [], [], [], []
    for sweep in range(burn_in + n_samples):
        smoothed = smooth(dynamics, paths, pseudo.values, pseudo.variances, generator)
        if sweep >= burn_in:
            means.append(smoothed.means)
            variances.append(smoothed.variances)
            draws.append(smoothed.samples)
            kept_paths.append(paths)
        emissions = potentials + ar_log_likelihoods(dynamics, smoothed.samples)
        paths = sample_state_paths(prior.log_p_inf, prior.log_P, emissions, 1, generator)[0]
    means, draws = torch.stack(means), torch.stack(draws)
    within, between = torch.stack(variances).mean(0), means.var(0, unbiased=False)
    k = prior.log_P.shape[0]
    frequencies = torch.nn.functional.one_hot(torch.stack(kept_paths), k).to(decoder_mean.dtype).mean(0)
    clamped = pseudo.clamped.double().mean((1, 2))
    return Posterior(means.mean(0), (within + between).sqrt(), draws, frequencies, frequencies.argmax(-1), clamped)


METHODS = {"sample": decode, "gibbs": gibbs}
"""The inference methods by name (``method`` of a Bayesian decoder)."""


# --- the fitted combination, as the model registry builds it ---------------------------------

@dataclass
class BayesianDecoderConfig:
    """A Bayesian decoder: an ARHMM prior and two trained decoders of the same neural activity.

    Attributes:
        model_class: ``bayesian-decoder``.
        prior_scale: c >= 1, the factor on the prior marginals' variances before they are
            divided out of the latent decoder's Gaussian (large: the prior counted twice; 1:
            divided out exactly, most frames clamped).
        n_posterior_samples: S, state paths sampled per trial (Gibbs: sweeps kept).
        method: ``sample`` (sampled state paths, then the smoother) or ``gibbs`` (Gibbs
            sampling over states and latents; slower, a cross-check).
        rng_seed_model: seed of the sampled paths and draws.
        latent_decoder: the config of the decoder of AE latents (filled from its run).
        state_decoder: the config of the decoder of ARHMM states (filled from its run).
        n_states, n_dims, n_lags: the ARHMM's states, latent dimensions and lags (filled).
    """

    model_class: str = "bayesian-decoder"
    prior_scale: float = 1e3
    n_posterior_samples: int = 8
    method: str = "sample"
    rng_seed_model: int = 0
    latent_decoder: dict = field(default_factory=dict, metadata=FILLED)
    state_decoder: dict = field(default_factory=dict, metadata=FILLED)
    n_states: int = field(default=2, metadata=FILLED)
    n_dims: int = field(default=1, metadata=FILLED)
    n_lags: int = field(default=1, metadata=FILLED)

    def validate(self) -> None:
        if self.prior_scale < 1:
            raise ConfigError(f"prior_scale must be at least 1, got {self.prior_scale} (below 1 the prior divided out "
                              f"would be sharper than the one the smoother puts back)")
        if self.n_posterior_samples < 1:
            raise ConfigError(f"n_posterior_samples must be at least 1, got {self.n_posterior_samples}")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got '{self.method}'")


TRIALS_PER_BATCH = 64
"""Trials of one length decoded together (each holds S paths of T x M x M covariances)."""
PRIOR_BUFFERS = ("log_P", "log_p_inf", "transition", "offset", "noise", "initial_mean", "initial_cov")


@register("bayesian-decoder", family="bayesian-decoder", config_type=BayesianDecoderConfig)
class BayesianDecoder(nn.Module):
    """The latent and state decoders and the ARHMM's prior, saved and loaded as one model."""

    def __init__(self, config: BayesianDecoderConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.latent_decoder = build_model(config_from_dict(config.latent_decoder))
        self.state_decoder = build_model(config_from_dict(config.state_decoder))
        k, d, size = config.n_states, config.n_dims, config.n_dims * max(config.n_lags, 1)
        shapes = {"log_P": (k, k), "log_p_inf": (k,), "transition": (k, size, size), "offset": (k, size),
                  "noise": (k, size, size), "initial_mean": (size,), "initial_cov": (size, size), "error_var": (d,)}
        for name, shape in shapes.items():
            self.register_buffer(name, torch.zeros(shape, dtype=torch.float64))

    def set_prior(self, prior: ARHMMPrior, error_var: torch.Tensor) -> None:
        """The ARHMM's prior and the latent decoder's error variance per dimension."""
        for name in PRIOR_BUFFERS:
            source = getattr(prior, name) if hasattr(prior, name) else getattr(prior.dynamics, name)
            getattr(self, name).copy_(source)
        self.error_var.copy_(error_var)

    def prior(self) -> ARHMMPrior:
        dynamics = SwitchingDynamics(self.transition, self.offset, self.noise, self.initial_mean, self.initial_cov,
                                     self.config.n_dims, self.config.n_lags)
        return ARHMMPrior(self.log_P, self.log_p_inf, dynamics)

    @torch.no_grad()
    def direct(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two decoders' own answers for one trial's inputs (T, n_input): latent means and
        state probabilities."""
        self.eval()
        inputs = inputs.to(self.log_P.device)
        return self.latent_decoder.predict(inputs).double(), self.state_decoder.predict(inputs).double()

    @torch.no_grad()
    def posterior(self, trials: list[torch.Tensor], keys: list[int] | None = None,
                  direct: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> list[Posterior]:
        """The posterior of each trial (inputs (T, n_input) each), trials of one length decoded
        together. Each trial draws from its own generator, seeded by ``rng_seed_model`` and its
        key (its trial index; by default its position), so its answer does not depend on which
        trials are decoded with it. ``direct``: the decoders' answers (:meth:`direct`) where the
        caller has them already."""
        keys = list(keys) if keys is not None else list(range(len(trials)))
        direct = direct if direct is not None else [self.direct(inputs) for inputs in trials]
        answers: list[Posterior | None] = [None] * len(trials)
        by_length: dict[int, list[int]] = {}
        for i, inputs in enumerate(trials):
            by_length.setdefault(len(inputs), []).append(i)
        for indices in by_length.values():
            for start in range(0, len(indices), TRIALS_PER_BATCH):
                chunk = indices[start:start + TRIALS_PER_BATCH]
                seeds = [self.config.rng_seed_model * 1_000_003 + int(keys[i]) for i in chunk]
                generators = [torch.Generator(self.log_P.device).manual_seed(seed) for seed in seeds]
                batch = METHODS[self.config.method](
                    self.prior(), torch.stack([direct[i][0] for i in chunk]), self.error_var,
                    torch.stack([direct[i][1] for i in chunk]), self.config.prior_scale,
                    self.config.n_posterior_samples, generators)
                for j, i in enumerate(chunk):
                    answers[i] = Posterior(batch.mean[j], batch.spread[j], batch.samples[:, j],
                                           batch.state_probabilities[j], batch.viterbi[j], batch.clamped_fraction[j])
        return answers


def _serve_posterior(model: BayesianDecoder, inputs: dict) -> dict:
    (posterior,) = model.posterior([torch.from_numpy(inputs["inputs"])])
    return {"latents": posterior.mean.float().numpy()}


register_serving("bayesian-decoder", ServingSpec(
    inputs=lambda model: {"inputs": (-1, decoder_input_size(model.latent_decoder))}, predict=_serve_posterior,
    example=lambda model: decoder_example(model.latent_decoder),
    input_docs={"inputs": "one trial's neural activity (frames, neurons)"}))
