"""Initial-state and transition models: log probabilities, priors and M-steps (ssm's)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize

from bnet.models.arhmm.batch import SequenceBatch

INITIAL_STATE_PSEUDOCOUNT = 1e-8
STATIONARY_PSEUDOCOUNT = 1e-32
STICKY_PSEUDOCOUNT = 1e-16
"""ssm adds these to the expected counts (and 1e-16 again to sticky probabilities)."""

LBFGS_TOLERANCE = 1e-4
LBFGS_MAX_ITER = 1000
NONFINITE_GRADIENT = 1e8
"""ssm's recurrent M-step: scipy L-BFGS-B with these settings, non-finite gradient entries
replaced by 1e8."""


def log_transition_matrices(transitions: str, x: torch.Tensor, log_Ps: torch.Tensor | None,
                            Rs: torch.Tensor | None, r: torch.Tensor | None) -> torch.Tensor:
    """Normalised log transition matrices: (K, K) for stationary and sticky transitions,
    else (N, T-1, K, K) with [n, t, i, j] = log p(z_{t+1} = j | z_t = i, x_t)."""
    if transitions in ("stationary", "sticky"):
        return torch.log_softmax(log_Ps, dim=-1)
    drive = x[:, :-1] @ Rs.T
    if transitions == "recurrent":
        return torch.log_softmax(log_Ps + drive.unsqueeze(-2), dim=-1)
    rows = torch.log_softmax(r + drive, dim=-1).unsqueeze(-2)
    return rows.expand(*rows.shape[:-2], r.shape[0], r.shape[0])


def initial_state_m_step(first_states: torch.Tensor) -> torch.Tensor:
    """log pi0 from the summed posteriors of z_0 (K,)."""
    counts = first_states + INITIAL_STATE_PSEUDOCOUNT
    return (counts / counts.sum()).log()


def stationary_m_step(joints: torch.Tensor) -> torch.Tensor:
    """log P from summed pairwise posteriors (K, K)."""
    counts = joints + STATIONARY_PSEUDOCOUNT
    matrix = torch.nan_to_num(counts / counts.sum(-1, keepdim=True))
    return (matrix / matrix.sum(-1, keepdim=True)).log()


def sticky_m_step(joints: torch.Tensor, kappa: float, alpha: float) -> torch.Tensor:
    """MAP log P under the sticky Dirichlet prior; rows are off normalisation by ~1e-16, as
    in ssm (every use normalises them)."""
    eye = torch.eye(joints.shape[0], dtype=joints.dtype, device=joints.device)
    counts = joints + STICKY_PSEUDOCOUNT + kappa * eye + (alpha - 1)
    return (counts / counts.sum(-1, keepdim=True) + STICKY_PSEUDOCOUNT).log()


def sticky_log_prior(log_Ps: torch.Tensor, kappa: float, alpha: float) -> torch.Tensor:
    """sum_k sum_j (alpha - 1 + kappa [j = k]) log P_kj."""
    eye = torch.eye(log_Ps.shape[0], dtype=log_Ps.dtype, device=log_Ps.device)
    return ((alpha - 1 + kappa * eye) * torch.log_softmax(log_Ps, dim=-1)).sum()


def recurrent_m_step(transitions: str, batch: SequenceBatch, expected_states: torch.Tensor,
                     expected_joints: torch.Tensor, log_Ps: torch.Tensor | None,
                     Rs: torch.Tensor, r: torch.Tensor | None):
    """ssm's gradient M-step for recurrent transitions, warm-started at the current values.

    Minimises -(sum_n sum_t sum_ij E[z_t = i, z_{t+1} = j] log P_t(i, j)) / T_total with
    scipy's L-BFGS-B. Since log P_t(i, j) = s_ij + R_j x_t - logsumexp_j'(s_ij' + R_j' x_t)
    (s = log_Ps, or r broadcast over rows), the objective needs only the summed joints,
    sum_t E[z_{t+1} = j] x_t and, per transition, x_t with E[z_t = i].

    Returns:
        (log_Ps, Rs, r) with None for the parameters the transition model lacks.
    """
    as_float64 = {"dtype": torch.float64, "device": Rs.device}
    has_next = batch.mask[:, 1:]
    previous = batch.x[:, :-1][has_next].to(**as_float64)
    leaving = expected_states[:, :-1][has_next].to(**as_float64)
    arriving = expected_states[:, 1:][has_next].to(**as_float64)
    joints = expected_joints.to(**as_float64)
    drive_stats = arriving.T @ previous
    # ssm's flattening order: (log_Ps, Rs) for recurrent, (Rs, r) for recurrent_only.
    start = [log_Ps, Rs] if transitions == "recurrent" else [Rs, r]
    shapes = [p.shape for p in start]
    sizes = [p.numel() for p in start]

    def unflatten(theta: torch.Tensor) -> list[torch.Tensor]:
        return [part.view(shape) for part, shape in zip(theta.split(sizes), shapes)]

    if transitions == "recurrent":
        def expected_log_joint(theta: torch.Tensor) -> torch.Tensor:
            scores, weights = unflatten(theta)
            normalizers = torch.logsumexp(scores + (previous @ weights.T).unsqueeze(-2), dim=-1)
            return (joints * scores).sum() + (drive_stats * weights).sum() - (leaving * normalizers).sum()
    else:
        arrivals = joints.sum(0)

        def expected_log_joint(theta: torch.Tensor) -> torch.Tensor:
            weights, bias = unflatten(theta)
            normalizers = torch.logsumexp(bias + previous @ weights.T, dim=-1)
            return (arrivals * bias).sum() + (drive_stats * weights).sum() - normalizers.sum()

    def objective(flat: np.ndarray) -> tuple[float, np.ndarray]:
        theta = torch.tensor(flat, **as_float64, requires_grad=True)
        value = -expected_log_joint(theta) / batch.n_frames
        (gradient,) = torch.autograd.grad(value, theta)
        gradient = gradient.cpu().numpy()
        gradient[~np.isfinite(gradient)] = NONFINITE_GRADIENT
        return value.item(), gradient

    x0 = torch.cat([p.reshape(-1) for p in start]).to(**as_float64).cpu().numpy()
    result = minimize(objective, x0, jac=True, method="L-BFGS-B", tol=LBFGS_TOLERANCE,
                      options={"maxiter": LBFGS_MAX_ITER})
    fitted = unflatten(torch.as_tensor(result.x, dtype=Rs.dtype, device=Rs.device))
    return (*fitted, None) if transitions == "recurrent" else (None, *fitted)
