"""Forward-backward and Viterbi over a padded batch of sequences.

Every function takes

* ``log_pi0``: (K,) normalised log initial-state probabilities,
* ``log_trans``: normalised log transition matrices, (K, K) shared by every step or
  (N, Tmax-1, K, K) with [n, t, i, j] = log p(z_{t+1} = j | z_t = i) for sequence n,
* ``log_likes``: (N, Tmax, K) log p(x_t | z_t = k, past),
* ``mask``: (N, Tmax) True on real frames (each sequence fills the start of its row).

The only Python loops run over time; each step works on the whole batch. Messages are kept
in log space, but each step propagates probabilities (``exp`` of the log message minus its
maximum) through the transition matrix, as ssm does: one matrix product per step, and
stable in float32 because the largest propagated entry is always 1.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

VITERBI_EPS = 1e-16
"""ssm's Viterbi scores log(P + 1e-16) and log(pi0 + 1e-16); copied so paths agree."""


class ForwardBackward(NamedTuple):
    log_normalizers: torch.Tensor
    """(N,) log p(x_{0:T_n}) per sequence."""
    expected_states: torch.Tensor
    """(N, Tmax, K) E[z_t = k]; zero in the padding."""
    expected_joints: torch.Tensor
    """(N, K, K) sum over t of E[z_t = i, z_{t+1} = j]."""


def _exp_below(log_values: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    """exp(log_values - peak) for a peak >= every value.

    Differences below log(smallest normal float) are raised to it: such terms are far below
    the resolution of the sums they enter, and exp runs many times slower when its result
    underflows into subnormals.
    """
    floor = math.log(torch.finfo(log_values.dtype).tiny)
    return (log_values - peak).clamp_min(floor).exp()


def _exp_relative_to_max(log_values: torch.Tensor) -> torch.Tensor:
    """exp(log_values - their max over the last axis): the largest entry is 1."""
    return _exp_below(log_values, log_values.amax(-1, keepdim=True))


def _time_major(trans: torch.Tensor) -> torch.Tensor:
    """(N, T-1, K, K) -> contiguous (T-1, N, K, K); a shared (K, K) matrix stays as it is."""
    return trans if trans.dim() == 2 else trans.transpose(0, 1).contiguous()


def _step_matrix(trans: torch.Tensor, t: int) -> torch.Tensor:
    """From a time-major transition tensor: the (K, K) or (N, K, K) matrices of step t -> t+1."""
    return trans if trans.dim() == 2 else trans[t]


def _propagate_forward(prob: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """sum_i prob[n, i] matrix[(n,) i, j]."""
    if matrix.dim() == 2:
        return prob @ matrix
    return (prob.unsqueeze(1) @ matrix).squeeze(1)


def _propagate_backward(prob: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """sum_j matrix[(n,) i, j] prob[n, j]."""
    if matrix.dim() == 2:
        return prob @ matrix.T
    return (matrix @ prob.unsqueeze(-1)).squeeze(-1)


def forward_backward(log_pi0: torch.Tensor, log_trans: torch.Tensor, log_likes: torch.Tensor,
                     mask: torch.Tensor) -> ForwardBackward:
    """Log-normalisers, posterior marginals and summed pairwise posteriors."""
    n_steps = log_likes.shape[1]
    trans = _time_major(log_trans.exp())
    # Time-major copies make every per-step slice contiguous.
    likes = log_likes.transpose(0, 1).contiguous()
    valid = mask.transpose(0, 1).unsqueeze(-1)

    log_alpha = torch.empty_like(likes)
    log_alpha[0] = log_pi0 + likes[0]
    for t in range(1, n_steps):
        previous = log_alpha[t - 1]
        peak = previous.amax(-1, keepdim=True)
        predicted = _propagate_forward(_exp_below(previous, peak), _step_matrix(trans, t - 1))
        # Finished sequences carry their last message forward, so the final one is theirs.
        log_alpha[t] = torch.where(valid[t], predicted.log() + peak + likes[t], previous)
    log_normalizers = torch.logsumexp(log_alpha[-1], dim=-1)

    log_beta = torch.zeros_like(likes)
    for t in range(n_steps - 2, -1, -1):
        following = likes[t + 1] + log_beta[t + 1]
        peak = following.amax(-1, keepdim=True)
        propagated = _propagate_backward(_exp_below(following, peak), _step_matrix(trans, t))
        log_beta[t] = torch.where(valid[t + 1], propagated.log() + peak, 0.0)

    expected_states = torch.softmax(log_alpha + log_beta, dim=-1) * valid
    expected_joints = _summed_joints(log_alpha, log_beta, likes, trans, valid)
    return ForwardBackward(log_normalizers, expected_states.transpose(0, 1).contiguous(), expected_joints)


def _summed_joints(log_alpha, log_beta, likes, trans, valid) -> torch.Tensor:
    """sum_t E[z_t = i, z_{t+1} = j] per sequence, without a (T, N, K, K) posterior tensor
    when the transition matrix is shared.

    E[z_t = i, z_{t+1} = j] = a_ti P_t(i, j) b_tj / Z_t with a = exp(log alpha_t - max),
    b = exp(log p(x_{t+1} | z_{t+1}) + log beta_{t+1} - max) and Z_t its sum over (i, j):
    normalising each step, as ssm does, keeps every term in range.
    """
    a = _exp_relative_to_max(log_alpha[:-1])
    b = _exp_relative_to_max(likes[1:] + log_beta[1:])
    tiny = torch.finfo(a.dtype).tiny
    if trans.dim() == 2:
        normalizer = ((a @ trans) * b).sum(-1)
        weight = torch.where(valid[1:, :, 0], 1.0 / normalizer.clamp_min(tiny), 0.0)
        return trans * torch.einsum("tni,tnj->nij", a * weight.unsqueeze(-1), b)
    normalizer = torch.einsum("tni,tnij,tnj->tn", a, trans, b)
    weight = torch.where(valid[1:, :, 0], 1.0 / normalizer.clamp_min(tiny), 0.0)
    return torch.einsum("tni,tnij,tnj->nij", a * weight.unsqueeze(-1), trans, b)


def viterbi(log_pi0: torch.Tensor, log_trans: torch.Tensor, log_likes: torch.Tensor,
            mask: torch.Tensor) -> torch.Tensor:
    """(N, Tmax) most likely state paths, -1 in the padding.

    Max-sum messages run backward and the path is read forward, like ssm's, so that ties
    resolve the same way: to the lowest state index.
    """
    n_seq, n_steps, _ = log_likes.shape
    log_matrix = _time_major((log_trans.exp() + VITERBI_EPS).log())
    likes = log_likes.transpose(0, 1)
    valid = mask.transpose(0, 1)

    scores = torch.zeros_like(likes[0])
    best_next = torch.zeros(n_steps, *likes.shape[1:], dtype=torch.long, device=likes.device)
    for t in range(n_steps - 2, -1, -1):
        candidates = _step_matrix(log_matrix, t) + (scores + likes[t + 1]).unsqueeze(-2)
        best, best_next[t + 1] = candidates.max(dim=-1)
        scores = torch.where(valid[t + 1].unsqueeze(-1), best, 0.0)

    log_pi0_eps = (log_pi0.exp() + VITERBI_EPS).log()
    states = torch.empty(n_steps, n_seq, dtype=torch.long, device=likes.device)
    states[0] = (scores + log_pi0_eps + likes[0]).argmax(-1)
    for t in range(1, n_steps):
        states[t] = best_next[t].gather(-1, states[t - 1].unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, states, -1).transpose(0, 1)
