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


CPU_FRAME_BLOCK = 4096
"""Frames per block of the per-frame products on the CPU. Blocks stay in cache, and their
intermediates stay below glibc's 32 MiB mmap threshold, so they are not mapped (and
page-faulted) afresh on every call: about 4x faster than whole-batch products at 50k
frames. Other devices take all frames at once."""


def _frame_blocks(n_frames: int, device: torch.device) -> list[slice]:
    size = CPU_FRAME_BLOCK if device.type == "cpu" else max(n_frames, 1)
    return [slice(start, start + size) for start in range(0, n_frames, size)]


def _squared_projection_norms(batch: SequenceBatch, projection: torch.Tensor) -> torch.Tensor:
    """(K, Tmax, N) ||[x~_t, x_t] @ projection[k]||^2 from projection (K, P+D, D), block by block.

    Whitened residuals are of this form: (x - x~ W) U = [x~, x] [-W U; U]. The rows are
    taken about ``batch.centre`` c, so the bias row of the projection gains c @ projection.
    """
    frames = batch.regression_rows
    bias = batch.design.shape[-1] - 1
    shifted = projection.to(torch.float64, copy=True)
    shifted[:, bias] += torch.einsum("p,kpd->kd", batch.centre.double(), shifted)
    n_states, n_inputs, n_dims = projection.shape
    rows = shifted.transpose(1, 2).reshape(n_states * n_dims, n_inputs).to(frames.dtype)
    norms = frames.new_empty(n_states, frames.shape[0])
    for block in _frame_blocks(frames.shape[0], frames.device):
        norms[:, block] = (rows @ frames[block].T).square_().view(n_states, n_dims, -1).sum(1)
    return norms.view(n_states, *batch.time_mask.shape)


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
    """(K, Tmax, N) squared Mahalanobis distances of x_t from mu_tk, and (K, 1, 1) half log-dets."""
    whitening, half_log_det = _whitening(Sigmas, diagonal)
    projection = torch.cat([-weights @ whitening, whitening], dim=1)
    return _squared_projection_norms(batch, projection), half_log_det.view(-1, 1, 1)


def studentst_log_density(q: torch.Tensor, half_log_det: torch.Tensor, nus: torch.Tensor,
                          n_dims: int) -> torch.Tensor:
    """Multivariate t log density from squared Mahalanobis distances q, broadcast against
    ``half_log_det`` and ``nus``."""
    return (-0.5 * (nus + n_dims) * torch.log1p(q / nus)
            + torch.lgamma(0.5 * (nus + n_dims)) - torch.lgamma(0.5 * nus)
            - 0.5 * n_dims * torch.log(math.pi * nus) - half_log_det)


def emission_log_likelihoods(batch: SequenceBatch, As: torch.Tensor, bs: torch.Tensor,
                             Sigmas: torch.Tensor, nus: torch.Tensor | None,
                             diagonal: bool) -> torch.Tensor:
    """(K, Tmax, N) log p(x_t | z_t = k, x_{t-1}, ..., x_{t-L}), time-major.

    Frames t < L (and the padding) get ssm's fixed N(0, I) density in every state.
    """
    n_dims = batch.n_dims
    q, half_log_det = squared_mahalanobis(batch, regression_weights(As, bs), Sigmas, diagonal)
    if nus is None:
        ar = (-0.5 * n_dims * LOG_2PI - half_log_det) - 0.5 * q
    else:
        ar = studentst_log_density(q, half_log_det, nus.view(-1, 1, 1), n_dims)
    initial = -0.5 * n_dims * LOG_2PI - 0.5 * batch.x.square().sum(-1).T
    return torch.where(batch.ar_time_mask, ar, initial)


def _as_stored(covariances: torch.Tensor, diagonal: bool) -> torch.Tensor:
    """What ssm's covariance setters keep: the diagonal, or the matrix plus 1e-8 I."""
    if diagonal:
        return torch.diag_embed(torch.diagonal(covariances, dim1=-2, dim2=-1))
    eye = torch.eye(covariances.shape[-1], dtype=covariances.dtype, device=covariances.device)
    return covariances + COVARIANCE_JITTER * eye


MOMENT_FRAMES = 1 << 16
"""Frames gathered at once for the weighted moments: at most K times this many rows."""
MOMENT_BLOCK = 1 << 14
"""Gathered frames per float32 product summed into the float64 moments."""
NEGLIGIBLE_WEIGHT = 1e-3
"""Posterior weights below this times the dtype's resolution times the state's largest
weight are left out of its moments: each adds less than a thousandth of a rounding error to
its sums (relative to the largest, so a state nearly unused keeps all its frames)."""


def _weighted_moments(batch: SequenceBatch, weights: torch.Tensor) -> torch.Tensor:
    """(K, P+D, P+D) sum_t w_tk [x~_t, x_t] [x~_t, x_t]^T in float64, from weights (K, Tmax, N).

    Every M-step quantity follows from these K small matrices: the regression normal
    equations and the residual scatter of any W. The scatter cancels (E[yy^T] against
    W^T E[x~y^T]), so the products are taken about the mean frame in the frames' dtype
    (float32 keeps the precision of what varies), summed block by block in float64 and
    moved back to the origin. Posteriors are mostly near 0 or 1, so each state's frames
    of non-negligible weight are gathered first: about 1/K of the products, 2x faster at
    K = 8 than weighing every frame in every state.
    """
    frames = batch.regression_rows
    n_states, n_inputs = weights.shape[0], frames.shape[1]
    flat_weights = weights.reshape(n_states, -1)
    thresholds = NEGLIGIBLE_WEIGHT * torch.finfo(flat_weights.dtype).eps * flat_weights.amax(1, keepdim=True)
    moments = torch.zeros(n_states, n_inputs, n_inputs, dtype=torch.float64, device=frames.device)
    for first in range(0, frames.shape[0], MOMENT_FRAMES):
        part = slice(first, first + MOMENT_FRAMES)
        states, kept = (flat_weights[:, part] > thresholds).nonzero(as_tuple=True)
        gathered = frames[part].index_select(0, kept)
        weighted = gathered * flat_weights[:, part][states, kept].unsqueeze(1)
        start = 0
        for state, count in enumerate(torch.bincount(states, minlength=n_states).tolist()):
            for block in range(start, start + count, MOMENT_BLOCK):
                block = slice(block, min(block + MOMENT_BLOCK, start + count))
                moments[state] += (weighted[block].T @ gathered[block]).double()
            start += count
    # r = r' + c (r'_bias = 1): M = M' + c m^T + m c^T + M'_bias,bias c c^T, m = M'[:, bias]
    bias = batch.design.shape[-1] - 1
    shift, about_centre = batch.centre.double(), moments[:, :, bias]
    return (moments + shift[:, None] * about_centre.unsqueeze(1) + about_centre.unsqueeze(2) * shift
            + moments[:, bias, bias, None, None] * torch.outer(shift, shift))


def _regression(moments: torch.Tensor, n_regressors: int,
                prior_mean: torch.Tensor | None = None) -> torch.Tensor:
    """W (K, P, D) = (sum w x~ x~^T + J0)^-1 (sum w x~ y^T + J0 prior_mean), J0 = 1e-8 I:
    ssm's weighted least squares with its weak prior (mean 0 unless given)."""
    xxT, xyT = moments[:, :n_regressors, :n_regressors], moments[:, :n_regressors, n_regressors:]
    eye = torch.eye(n_regressors, dtype=moments.dtype, device=moments.device)
    if prior_mean is not None:
        xyT = xyT + REGRESSION_PRIOR_PRECISION * prior_mean
    return torch.linalg.solve(xxT + REGRESSION_PRIOR_PRECISION * eye, xyT)


def _residual_scatter(moments: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """sum_t w_tk (y_t - W_k^T x~_t)(y_t - W_k^T x~_t)^T = [-W; I]^T moments [-W; I]."""
    n_dims = W.shape[-1]
    eye = torch.eye(n_dims, dtype=W.dtype, device=W.device).expand(W.shape[0], -1, -1)
    coefficients = torch.cat([-W, eye], dim=1)
    scatter = coefficients.transpose(1, 2) @ moments @ coefficients
    return 0.5 * (scatter + scatter.transpose(1, 2))


def gaussian_m_step(batch: SequenceBatch, weights: torch.Tensor,
                    diagonal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ssm's closed-form Gaussian AR M-step: MAP regression and covariance.

    Args:
        weights: (K, Tmax, N) posterior state probabilities, zero outside ``batch.ar_mask``.

    Returns:
        As, bs and the covariances in use (ssm's stored ``Sigmas``), in the batch's dtype.
    """
    n_dims, n_regressors = batch.n_dims, batch.design.shape[-1]
    moments = _weighted_moments(batch, weights)
    eye_d = torch.eye(n_dims, dtype=moments.dtype, device=moments.device)
    prior_mean = torch.zeros(n_regressors, n_dims, dtype=moments.dtype, device=moments.device)
    if batch.lags > 0:
        prior_mean[:n_dims] = eye_d
    W = _regression(moments, n_regressors, prior_mean)
    # As in ssm, the covariance takes the weighted scatter of the residuals, without the
    # regression prior's terms.
    dof = COVARIANCE_PRIOR_DOF + weights.sum((1, 2)).double() + n_dims + 1
    Sigmas = (_residual_scatter(moments, W) + COVARIANCE_PRIOR_SCALE * eye_d) / dof[:, None, None]
    dtype = batch.x.dtype
    return *split_regression_weights(W.to(dtype)), _as_stored(Sigmas, diagonal).to(dtype)


def studentst_m_step(batch: SequenceBatch, expected_states: torch.Tensor, As: torch.Tensor,
                     bs: torch.Tensor, Sigmas: torch.Tensor, nus: torch.Tensor,
                     diagonal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ssm's Student-t AR M-step: one inner EM step on the scale-mixture, then nu.

    Args:
        expected_states: (K, Tmax, N) posterior state probabilities over all real frames
            (the first L frames enter the normaliser of the nu statistics).

    Returns:
        As, bs, the scale matrices in use, nus.
    """
    n_dims, n_regressors = batch.n_dims, batch.design.shape[-1]
    weights = expected_states * batch.ar_time_mask
    half_dof = 0.5 * nus.view(-1, 1, 1)

    # E-step of the scale mixture under the current parameters.
    q, _ = squared_mahalanobis(batch, regression_weights(As, bs), Sigmas, diagonal)
    tau_weights = weights * (half_dof + 0.5 * n_dims) / (half_dof + 0.5 * q)

    moments = _weighted_moments(batch, tau_weights)
    W = _regression(moments, n_regressors)
    scale = (_residual_scatter(moments, W) / weights.sum((1, 2)).double()[:, None, None]
             + COVARIANCE_JITTER * torch.eye(n_dims, dtype=moments.dtype, device=moments.device))
    # ssm adds 1e-8 I above and its setter again: a full scale matrix carries 2e-8 I.
    new_Sigmas = _as_stored(scale, diagonal)

    # nu from the new regression and scale, with the old nu in the expectations.
    q_new, _ = squared_mahalanobis(batch, W, new_Sigmas, diagonal)
    shape = half_dof + 0.5 * n_dims
    rate = half_dof + 0.5 * q_new
    total = expected_states.sum((1, 2))
    mean_tau = (weights * shape / rate).sum((1, 2)) / total
    mean_log_tau = (weights * (torch.digamma(shape) - rate.log())).sum((1, 2)) / total
    new_nus = [studentst_dof_newton(float(m), float(lm)) for m, lm in zip(mean_tau, mean_log_tau)]
    dtype = batch.x.dtype
    return (*split_regression_weights(W.to(dtype)), new_Sigmas.to(dtype),
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
