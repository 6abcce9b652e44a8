"""Forward-backward and Viterbi over a padded batch of sequences.

Every function takes

* ``log_pi0``: (K,) normalised log initial-state probabilities,
* ``log_trans``: normalised log transition matrices, (K, K) shared by every step or
  (N, Tmax-1, K, K) with [n, t, i, j] = log p(z_{t+1} = j | z_t = i) for sequence n,
* ``log_likes``: (N, Tmax, K) log p(x_t | z_t = k, past),
* ``mask``: (N, Tmax) True on real frames (each sequence fills the start of its row).

The only Python loops run over time; each step works on the whole batch, in place, with
three or four tensor operations. The recursions are the scaled (Rabiner) ones in probability
space: emission likelihoods are exponentiated relative to their per-frame maximum (so the
largest is 1) and every forward message is renormalised, its sum kept as the step's
scale; the log-normaliser is the sum of the log scales and maxima. Padding needs no
branch: a padded frame gets likelihood 1 and scale 1, so the forward messages past a
sequence's end never feed back into it and its backward messages there stay 1.
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


def _time_major(trans: torch.Tensor) -> torch.Tensor:
    """(N, T-1, K, K) -> contiguous (T-1, N, K, K); a shared (K, K) matrix stays as it is."""
    return trans if trans.dim() == 2 else trans.transpose(0, 1).contiguous()


def _step_matrix(trans: torch.Tensor, t: int) -> torch.Tensor:
    """From a time-major transition tensor: the (K, K) or (N, K, K) matrices of step t -> t+1."""
    return trans if trans.dim() == 2 else trans[t]


def forward_backward(log_pi0: torch.Tensor, log_trans: torch.Tensor, log_likes: torch.Tensor,
                     mask: torch.Tensor) -> ForwardBackward:
    """Log-normalisers, posterior marginals and summed pairwise posteriors."""
    n_steps = log_likes.shape[1]
    valid = mask.transpose(0, 1).unsqueeze(-1)
    likes = log_likes.transpose(0, 1).masked_fill(~valid, 0.0)
    peak = likes.amax(-1, keepdim=True)
    # Likelihoods below the smallest normal float relative to the frame's best are raised to
    # it: far below the resolution of the sums they enter, and exp and the products run many
    # times slower on subnormals.
    floor = math.log(torch.finfo(likes.dtype).tiny)
    emission = (likes - peak).clamp_min_(floor).exp_()
    shared = log_trans.dim() == 2
    trans = log_trans.exp() if shared else _time_major(log_trans.exp())
    trans_t = trans.T.contiguous() if shared else None

    # alpha[t] = p(z_t | x_0..t), scale[t] = p(x_t | x_0..t-1) / exp(peak[t]). The loops run
    # in inference mode over per-step views made once: both cut the fixed cost of each of the
    # ~4 T small operations, which is the whole cost of these loops.
    with torch.inference_mode():
        alpha, scale = torch.empty_like(emission), torch.empty_like(peak)
        alphas, scales, emissions = alpha.unbind(0), scale.unbind(0), emission.unbind(0)
        steps = trans.unbind(0) if not shared else None
        torch.mul(emissions[0], log_pi0.exp(), out=alphas[0])
        for t in range(n_steps):
            if t > 0:
                if shared:
                    torch.mm(alphas[t - 1], trans, out=alphas[t])
                else:
                    torch.bmm(alphas[t - 1].unsqueeze(1), steps[t - 1], out=alphas[t].unsqueeze(1))
                alphas[t].mul_(emissions[t])
            torch.sum(alphas[t], -1, keepdim=True, out=scales[t])
            alphas[t].div_(scales[t])
        scale.masked_fill_(~valid, 1.0)
    log_normalizers = (scale.log() + peak).mul_(valid).sum((0, 2))

    # weighted[t] = p(x_t | z_t) beta[t] / scale[t] (relative to the peak), beta[t] =
    # p(x_t+1.. | z_t) / p(x_t+1.. | x_0..t): what the backward step and the pairwise
    # posteriors both need.
    with torch.inference_mode():
        weighted = torch.empty_like(emission)
        weights = weighted.unbind(0)
        torch.div(emissions[-1], scales[-1], out=weights[-1])
        for t in range(n_steps - 2, -1, -1):
            if shared:
                torch.mm(weights[t + 1], trans_t, out=weights[t])
            else:
                torch.bmm(steps[t], weights[t + 1].unsqueeze(-1), out=weights[t].unsqueeze(-1))
            weights[t].mul_(emissions[t]).div_(scales[t])
    beta_next = weighted[1:] @ trans_t if shared else (trans @ weighted[1:].unsqueeze(-1)).squeeze(-1)

    posterior = alpha.clone()
    posterior[:-1].mul_(beta_next)
    # Each step's marginal sums to 1 up to rounding; dividing by its sum removes that, and it
    # is also the sum over (i, j) of the step's pairwise posterior.
    total = posterior.sum(-1, keepdim=True)
    expected_states = (posterior * (valid / total)).transpose(0, 1).contiguous()
    left = alpha[:-1] * (valid[1:] / total[:-1])
    if shared:
        expected_joints = trans * torch.einsum("tni,tnj->nij", left, weighted[1:])
    else:
        expected_joints = torch.einsum("tni,tnij,tnj->nij", left, trans, weighted[1:])
    return ForwardBackward(log_normalizers, expected_states, expected_joints)


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
