"""Autoregressive emissions: log-likelihoods and M-steps, following ssm's conventions.

Regression weights are handled as W_k (K, P, D) with P = D*L + 1 rows: the lag blocks
(row block l multiplies x_{t-l-1}) and the bias last, so that mu_tk = design_t @ W_k.
``As[k] = W_k[:-1].T`` and ``bs[k] = W_k[-1]`` in ssm's layout.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import digamma, polygamma

from bnet.models.arhmm.batch import SequenceBatch

LOG_2PI = math.log(2 * math.pi)

REGRESSION_PRIOR_PRECISION = 1e-8
"""ssm's J0 = 1e-8 I on the regression weights; its mean pulls the lag-1 block to I."""
COVARIANCE_PRIOR_DOF = 1e-4
"""nu0 of ssm's inverse-Wishart prior on Gaussian covariances."""
COVARIANCE_PRIOR_SCALE = 1e-4
"""Psi0 = 1e-4 I of the same prior."""
COVARIANCE_JITTER = 1e-8
"""ssm adds 1e-8 I when it stores a full covariance (its Cholesky setter)."""

DOF_PRIOR_SHAPE = 3.0
DOF_PRIOR_RATE = 1.5
"""Gamma(3, 1.5) prior of ssm's degrees-of-freedom update."""


def regression_weights(As: torch.Tensor, bs: torch.Tensor) -> torch.Tensor:
    """ssm's (As, bs) -> W (K, P, D)."""
    return torch.cat([As.transpose(1, 2), bs.unsqueeze(1)], dim=1)


def split_regression_weights(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (K, P, D) -> ssm's As (K, D, D*L) and bs (K, D)."""
    return weights[:, :-1].transpose(1, 2).contiguous(), weights[:, -1].contiguous()


def _apply_per_state(batch: SequenceBatch, projection: torch.Tensor) -> torch.Tensor:
    """[x_t, design_t] @ projection[k] for every frame and state: (N, T, K, D) from (K, D+P, D).

    One matrix product over all states; residuals and whitened residuals are both of this
    form, e.g. x - design W = [x, design] [I; -W].
    """
    n_seq, n_steps, n_dims = batch.x.shape
    n_states, n_inputs, _ = projection.shape
    stacked = torch.cat([batch.x, batch.design], dim=-1)
    flat = stacked @ projection.transpose(0, 1).reshape(n_inputs, n_states * n_dims)
    return flat.view(n_seq, n_steps, n_states, n_dims)


def residuals(batch: SequenceBatch, weights: torch.Tensor) -> torch.Tensor:
    """(N, T, K, D) x_t - mu_tk."""
    eye = torch.eye(batch.n_dims, dtype=weights.dtype, device=weights.device)
    return _apply_per_state(batch, torch.cat([eye.expand(weights.shape[0], -1, -1), -weights], dim=1))


def _whitening(Sigmas: torch.Tensor, diagonal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """U (K, D, D) with r U the whitened residual row (U U^T = Sigma^-1), and (K,) half log-dets."""
    if diagonal:
        variances = torch.diagonal(Sigmas, dim1=-2, dim2=-1)
        return torch.diag_embed(variances.rsqrt()), 0.5 * variances.log().sum(-1)
    chol = torch.linalg.cholesky(Sigmas)
    eye = torch.eye(Sigmas.shape[-1], dtype=Sigmas.dtype, device=Sigmas.device)
    inv_chol = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
    return inv_chol.transpose(1, 2), torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1)


def squared_mahalanobis(batch: SequenceBatch, weights: torch.Tensor, Sigmas: torch.Tensor,
                        diagonal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T, K) squared Mahalanobis distances of x_t from mu_tk, and (K,) half log-dets:

    (x - design W) U = [x, design] [U; -W U] with U U^T = Sigma^-1.
    """
    whitening, half_log_det = _whitening(Sigmas, diagonal)
    whitened = _apply_per_state(batch, torch.cat([whitening, -weights @ whitening], dim=1))
    return whitened.square().sum(-1), half_log_det


def studentst_log_density(q: torch.Tensor, half_log_det: torch.Tensor, nus: torch.Tensor,
                          n_dims: int) -> torch.Tensor:
    """Multivariate t log density from squared Mahalanobis distances q (..., K)."""
    return (-0.5 * (nus + n_dims) * torch.log1p(q / nus)
            + torch.lgamma(0.5 * (nus + n_dims)) - torch.lgamma(0.5 * nus)
            - 0.5 * n_dims * torch.log(math.pi * nus) - half_log_det)


def emission_log_likelihoods(batch: SequenceBatch, As: torch.Tensor, bs: torch.Tensor,
                             Sigmas: torch.Tensor, nus: torch.Tensor | None,
                             diagonal: bool) -> torch.Tensor:
    """(N, Tmax, K) log p(x_t | z_t = k, x_{t-1}, ..., x_{t-L}).

    Frames t < L (and the padding) get ssm's fixed N(0, I) density in every state.
    """
    n_dims = batch.n_dims
    q, half_log_det = squared_mahalanobis(batch, regression_weights(As, bs), Sigmas, diagonal)
    if nus is None:
        ar = -0.5 * n_dims * LOG_2PI - half_log_det - 0.5 * q
    else:
        ar = studentst_log_density(q, half_log_det, nus, n_dims)
    initial = -0.5 * n_dims * LOG_2PI - 0.5 * batch.x.square().sum(-1, keepdim=True)
    return torch.where(batch.ar_mask.unsqueeze(-1), ar, initial)


def _solve(lhs: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    # K systems of P x P: solving them in float64 costs nothing and spares float32 fits an
    # ill-conditioned solve.
    return torch.linalg.solve(lhs.double(), rhs.double()).to(rhs.dtype)


def _as_stored(covariances: torch.Tensor, diagonal: bool) -> torch.Tensor:
    """What ssm's covariance setters keep: the diagonal, or the matrix plus 1e-8 I."""
    if diagonal:
        return torch.diag_embed(torch.diagonal(covariances, dim1=-2, dim2=-1))
    eye = torch.eye(covariances.shape[-1], dtype=covariances.dtype, device=covariances.device)
    return covariances + COVARIANCE_JITTER * eye


def _weighted_regression_stats(batch: SequenceBatch, weights: torch.Tensor):
    """sum_t w_tk x~ x~^T (K, P, P) and sum_t w_tk x~ y^T (K, P, D), from one product."""
    n_states, n_regressors = weights.shape[-1], batch.design.shape[-1]
    weighted = (weights.unsqueeze(-1) * batch.design.unsqueeze(2)).view(-1, n_states * n_regressors)
    targets = torch.cat([batch.design, batch.x], dim=-1).view(weighted.shape[0], -1)
    stats = (weighted.T @ targets).view(n_states, n_regressors, -1)
    return stats[..., :n_regressors], stats[..., n_regressors:]


def gaussian_m_step(batch: SequenceBatch, weights: torch.Tensor,
                    diagonal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ssm's closed-form Gaussian AR M-step: MAP regression and covariance.

    Args:
        weights: (N, Tmax, K) posterior state probabilities, zero outside ``batch.ar_mask``.

    Returns:
        As, bs and the covariances in use (ssm's stored ``Sigmas``).
    """
    n_dims, n_regressors = batch.n_dims, batch.design.shape[-1]
    eye_p = torch.eye(n_regressors, dtype=weights.dtype, device=weights.device)
    eye_d = torch.eye(n_dims, dtype=weights.dtype, device=weights.device)
    prior_mean = torch.zeros(n_regressors, n_dims, dtype=weights.dtype, device=weights.device)
    if batch.lags > 0:
        prior_mean[:n_dims] = eye_d
    xxT, xyT = _weighted_regression_stats(batch, weights)
    W = _solve(xxT + REGRESSION_PRIOR_PRECISION * eye_p,
               xyT + REGRESSION_PRIOR_PRECISION * prior_mean)

    # As in ssm, the covariance takes the weighted scatter of the residuals, without the
    # regression prior's terms; summing residuals rather than forming E[yy^T] - W^T E[xy^T]
    # avoids cancellation in float32.
    resid = residuals(batch, W)
    scatter = torch.einsum("ntk,ntkd,ntke->kde", weights, resid, resid)
    dof = COVARIANCE_PRIOR_DOF + weights.sum((0, 1)) + n_dims + 1
    Sigmas = (scatter + COVARIANCE_PRIOR_SCALE * eye_d) / dof[:, None, None]
    return *split_regression_weights(W), _as_stored(Sigmas, diagonal)


def studentst_m_step(batch: SequenceBatch, expected_states: torch.Tensor, As: torch.Tensor,
                     bs: torch.Tensor, Sigmas: torch.Tensor, nus: torch.Tensor,
                     diagonal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ssm's Student-t AR M-step: one inner EM step on the scale-mixture, then nu.

    Args:
        expected_states: (N, Tmax, K) posterior state probabilities over all real frames
            (the first L frames enter the normaliser of the nu statistics).

    Returns:
        As, bs, the scale matrices in use, nus.
    """
    n_dims = batch.n_dims
    weights = expected_states * batch.ar_mask.unsqueeze(-1)
    half_dof = 0.5 * nus

    # E-step of the scale mixture under the current parameters.
    q, _ = squared_mahalanobis(batch, regression_weights(As, bs), Sigmas, diagonal)
    tau_weights = weights * (half_dof + 0.5 * n_dims) / (half_dof + 0.5 * q)

    xxT, xyT = _weighted_regression_stats(batch, tau_weights)
    eye_p = torch.eye(xxT.shape[-1], dtype=xxT.dtype, device=xxT.device)
    W = _solve(xxT + REGRESSION_PRIOR_PRECISION * eye_p, xyT)
    resid = residuals(batch, W)
    eye_d = torch.eye(n_dims, dtype=xxT.dtype, device=xxT.device)
    scale = (torch.einsum("ntk,ntkd,ntke->kde", tau_weights, resid, resid)
             / weights.sum((0, 1))[:, None, None] + COVARIANCE_JITTER * eye_d)
    # ssm adds 1e-8 I above and its setter again: a full scale matrix carries 2e-8 I.
    new_Sigmas = _as_stored(scale, diagonal)

    # nu from the new regression and scale, with the old nu in the expectations.
    q_new, _ = squared_mahalanobis(batch, W, new_Sigmas, diagonal)
    shape = half_dof + 0.5 * n_dims
    rate = half_dof + 0.5 * q_new
    total = expected_states.sum((0, 1))
    mean_tau = (weights * shape / rate).sum((0, 1)) / total
    mean_log_tau = (weights * (torch.digamma(shape) - rate.log())).sum((0, 1)) / total
    new_nus = [studentst_dof_newton(float(m), float(lm)) for m, lm in zip(mean_tau, mean_log_tau)]
    return (*split_regression_weights(W), new_Sigmas,
            torch.tensor(new_nus, dtype=nus.dtype, device=nus.device))


def studentst_dof_newton(mean_tau: float, mean_log_tau: float, nu: float = 2.0,
                         max_iter: int = 100, nu_min: float = 1e-8, nu_max: float = 100.0,
                         tol: float = 1e-8) -> float:
    """ssm's generalized Newton iteration for nu under a Gamma(3, 1.5) prior.

    The prior terms are added to per-frame averages, so the prior weighs as much as all
    the data together; this is ssm's behaviour and is kept for agreement.
    """
    a, b = DOF_PRIOR_SHAPE, DOF_PRIOR_RATE
    step = np.inf
    for _ in range(max_iter):
        if abs(step) < tol:
            break
        if nu < nu_min or nu > nu_max:
            return float(np.clip(nu, nu_min, nu_max))
        gradient = (0.5 * (1 + np.log(nu / 2)) - 0.5 * digamma(nu / 2) + 0.5 * mean_log_tau
                    - 0.5 * mean_tau + (a - 1) / nu - b)
        curvature = 1 / (2 * nu) - 0.25 * polygamma(1, nu / 2) + (1 - a) / nu ** 2
        slope = -nu ** 2 * curvature
        intercept = gradient - slope / nu
        step = -slope / intercept - nu
        nu = nu + step
    return float(nu)
