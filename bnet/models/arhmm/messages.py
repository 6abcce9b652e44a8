"""Forward-backward and Viterbi over a padded batch of sequences, time-major.

Every function takes

* ``log_pi0``: (K,) normalised log initial-state probabilities,
* ``log_trans``: normalised log transition matrices, (K, K) shared by every step or
  (K, K, Tmax-1, N) with [i, j, t, n] = log p(z_{t+1} = j | z_t = i) for sequence n,
* ``log_likes``: (K, Tmax, N) log p(x_t | z_t = k, past),
* ``mask``: (Tmax, N) True on real frames (each sequence fills the start of its column).

States lie on the outer axis and sequences on the inner one, so that every step of a
recursion is a few wide vector operations and one matrix product. The recursions are the
scaled (Rabiner) ones in probability space: emission likelihoods are exponentiated
relative to their per-frame maximum (so the largest is 1) and every forward message is
renormalised, its sum kept as the step's scale; the log-normaliser is the sum of the log
scales and maxima. Padding needs no branch: a padded frame gets likelihood 1 and scale 1,
so the forward messages past a sequence's end never feed back into it and its backward
messages there stay constant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

VITERBI_EPS = 1e-16
"""ssm's Viterbi scores log(P + 1e-16) and log(pi0 + 1e-16); copied so paths agree."""


class ForwardBackward(NamedTuple):
    log_normalizers: torch.Tensor
    """(N,) log p(x_{0:T_n}) per sequence."""
    expected_states: torch.Tensor
    """(K, Tmax, N) E[z_t = k]; zero in the padding."""
    expected_joints: torch.Tensor
    """(K, K) sum over sequences and t of E[z_t = i, z_{t+1} = j] (all any M-step needs;
    per sequence it would cost a transposed copy of the messages)."""


def _step_major(trans: torch.Tensor) -> torch.Tensor:
    """(K, K, T-1, N) -> contiguous (T-1, N, K, K); a shared (K, K) matrix stays as it is."""
    return trans if trans.dim() == 2 else trans.permute(2, 3, 0, 1).contiguous()


def _step_matrix(trans: torch.Tensor, t: int) -> torch.Tensor:
    """From a time-major transition tensor: the (K, K) or (N, K, K) matrices of step t -> t+1."""
    return trans if trans.dim() == 2 else trans[t]


CPU_CHUNKED_WORK_LIMIT = 16384
"""Largest K^2 N for which the CPU cuts the recursions into chunks. Building the chunks'
transfers costs K^2 N per frame, against the ~4 loop steps per frame that chunking saves:
on 2-core CPUs chunking is 2-5x faster below K^2 N ~ 6,400 and about even at 16,000
(K = 4, N = 1000; K = 16, N = 100). GPUs always chunk: a step's launch costs more there."""


def _chunk_length(n_steps: int, n_states: int, n_seq: int, device: torch.device) -> int:
    """Steps per chunk: about sqrt(T), which balances the loops within and across chunks, or
    T (one chunk: the plain recursions) where the transfers would cost more than they save."""
    if device.type == "cpu" and n_states ** 2 * n_seq > CPU_CHUNKED_WORK_LIMIT:
        return max(n_steps, 1)
    return math.isqrt(max(n_steps - 1, 0)) + 1


def forward_backward(log_pi0: torch.Tensor, log_trans: torch.Tensor, log_likes: torch.Tensor,
                     mask: torch.Tensor) -> ForwardBackward:
    """Log-normalisers, posterior marginals and summed pairwise posteriors.

    A loop step costs a few microseconds whatever the size of its tensors, so where the
    batch is narrow (see :func:`_chunk_length`) the recursions are cut into C chunks of
    L ~ sqrt(T) steps and every loop runs ~sqrt(T) steps over all chunks at once (100
    sequences of 500 steps, K = 8: 2x faster than one loop over time). With
    G_t = diag(e_t) A_t (e_t the frame's likelihoods, A_t its step to t+1):

    1. each chunk's transfer G_s ... G_{s+L-1} is built as K forward filters at once, one
       from each state at the chunk's start: normalised, their log scales kept;
    2. the predictive state distribution at every chunk's start, chunk by chunk, and
    3. the backward message at every chunk's start, chunk by chunk backward, both through
       the transfers in log space (a start state can be far less likely than another);
    4. the scaled forward recursion and
    5. the backward recursion run within all chunks at once, from those starts.

    Step 4 is the sequential (Rabiner) recursion given exact starting distributions, so its
    scales give the log-normaliser. A backward message is only known up to a factor per
    step, which the marginals and pairwise posteriors normalise away.
    """
    n_states, n_steps, n_seq = log_likes.shape
    length = _chunk_length(n_steps, n_states, n_seq, log_likes.device)
    n_chunks = -(-n_steps // length)
    padded, width = n_chunks * length, n_chunks * n_seq
    like = {"dtype": log_likes.dtype, "device": log_likes.device}
    # (K, T', N): state, time, sequence; a padded frame has likelihood 1 in every state.
    valid = torch.zeros(1, padded, n_seq, dtype=torch.bool, device=mask.device)
    valid[0, :n_steps] = mask
    likes = torch.zeros(n_states, padded, n_seq, **like)
    likes[:, :n_steps] = log_likes
    if not bool(mask.all()):
        likes.masked_fill_(~valid, 0.0)
    peak = likes.amax(0, keepdim=True)
    # Likelihoods below twice the smallest normal float relative to the frame's best are
    # raised to it: far below the resolution of the sums they enter, and exp runs ~30x
    # slower where its result would be subnormal (most frames' unlikely states).
    floor = math.log(2 * torch.finfo(likes.dtype).tiny)
    emission = (likes - peak).clamp_min_(floor).exp_()
    shared = log_trans.dim() == 2
    if shared:
        trans = log_trans.exp()
    else:  # (K, K, T', N); steps past the last frame go anywhere (any matrix would do
        # there, and one that forgets at once lets the chunk filters agree)
        trans = torch.full((n_states, n_states, padded, n_seq), 1 / n_states, **like)
        trans[:, :, :n_steps - 1] = log_trans.exp()

    # One chunk (the plain recursions) runs on views of the time layout; several, on a
    # copy in which each step of all chunks is contiguous.
    def by_chunk(frames: torch.Tensor) -> torch.Tensor:
        """(..., T', N) -> (L, ..., C*N): step l of every chunk."""
        if n_chunks == 1:
            return frames.movedim(-2, 0)
        chunked = frames.view(*frames.shape[:-2], n_chunks, length, n_seq).movedim(-2, 0)
        return chunked.contiguous().view(length, *frames.shape[:-2], width)

    def by_time(chunks: torch.Tensor) -> torch.Tensor:
        """The inverse of by_chunk."""
        if n_chunks == 1:
            return chunks.movedim(0, -2)
        frames = chunks.view(*chunks.shape[:-1], n_chunks, n_seq).movedim(0, -2)
        return frames.reshape(*chunks.shape[1:-1], padded, n_seq)

    def new_chunked(n_rows: int) -> torch.Tensor:
        return by_chunk(torch.empty(n_rows, padded, n_seq, **like)) if n_chunks == 1 else \
            torch.empty(length, n_rows, width, **like)

    with torch.inference_mode():
        emissions = by_chunk(emission).unbind(0)
        steps = [trans] * length if shared else by_chunk(trans).unbind(0)

        starts, ends = _chunk_boundaries(log_pi0, trans, emissions, steps, n_seq, floor)

        # 4. alpha[t] = p(z_t | x_0..t), scale[t] = p(x_t | x_0..t-1) / exp(peak[t]).
        alpha, scale = new_chunked(n_states), new_chunked(1)
        predictive = starts.view(n_states, width)
        for step in range(length):
            torch.mul(predictive, emissions[step], out=alpha[step])
            torch.sum(alpha[step], 0, keepdim=True, out=scale[step])
            alpha[step].div_(scale[step])
            if step < length - 1:
                predictive = _forward(alpha[step], steps[step])

        # 5. weighted[t] ~ p(x_t | z_t) p(x_t+1.. | z_t), up to a factor per step: what the
        # pairwise posteriors and the marginals' backward factor both need.
        weighted = new_chunked(n_states)
        message = ends.view(n_states, width)
        for step in range(length - 1, -1, -1):
            torch.mul(_backward(steps[step], message), emissions[step], out=weighted[step])
            message = weighted[step].div_(weighted[step].sum(0, keepdim=True))
        alpha, scale, weighted = by_time(alpha), by_time(scale), by_time(weighted)

    # summed in float64: T terms in float32 would carry ~T rounding errors into the
    # likelihood that EM's tolerance compares between iterations
    log_normalizers = (scale.log() + peak).mul_(valid).double().sum((0, 1)).to(log_likes.dtype)
    step_trans = trans if shared else trans[:, :, :-1]
    following = weighted[:, 1:]
    posterior = alpha.clone()
    posterior[:, :-1].mul_(_backward(step_trans, following))
    # Each step's marginal sums to 1 up to rounding; dividing by its sum removes that, and it
    # is also the sum over (i, j) of the step's pairwise posterior.
    total = posterior.sum(0, keepdim=True)
    expected_states = (posterior * (valid / total))[:, :n_steps]
    left = alpha[:, :-1] * (valid[:, 1:] / total[:, :-1])
    if shared:
        expected_joints = trans * (left.reshape(n_states, -1) @ following.reshape(n_states, -1).T)
    else:
        expected_joints = (left.unsqueeze(1) * step_trans * following.unsqueeze(0)).sum((2, 3))
    return ForwardBackward(log_normalizers, expected_states, expected_joints)


AGREEMENT_ROUNDINGS = 16
"""Relative spread, in rounding errors of the dtype, below which the chunk filters from
different start states count as one (it falls geometrically once they forget their start)."""


def _chunk_boundaries(log_pi0: torch.Tensor, trans: torch.Tensor, emissions: Sequence[torch.Tensor],
                      steps: Sequence[torch.Tensor], n_seq: int, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-3 of :func:`forward_backward`: (K, C, N) predictive distributions and
    backward messages at the chunks' starts, from ``emissions`` (L, K, C*N) and the steps'
    matrices."""
    n_states, width = emissions[0].shape
    n_chunks, length = width // n_seq, len(emissions)
    starts = emissions[0].new_empty(n_states, n_chunks, n_seq)
    ends = torch.empty_like(starts)
    starts[:, 0] = log_pi0.exp().unsqueeze(-1)
    ends[:, -1] = 1.0
    if n_chunks == 1:
        return starts, ends

    # 1. Transfers (K, K, C*N): [j, i] from state i at the chunk's start to state j after
    # it. The start state sits on the middle axis so that a step over a shared matrix is
    # one wide product, whose row K (from the matrix's appended ones) is the totals. The
    # filters forget where they started, usually within a few steps: once every one agrees
    # with the others to rounding, a single filter per column carries on for all of them.
    shared = trans.dim() == 2
    if shared:
        transfer = trans.T.unsqueeze(-1).expand(n_states, n_states, width)
        summing = torch.cat([trans, trans.new_ones(n_states, 1)], dim=1).T.contiguous()
    else:
        transfer = steps[0].transpose(0, 1)
    totals = [emissions[0]]
    agreed, agreement = False, AGREEMENT_ROUNDINGS * torch.finfo(transfer.dtype).eps
    for step in range(1, length):
        weighted_rows = transfer * (emissions[step] if agreed else emissions[step].unsqueeze(1))
        if shared:
            moved = (summing @ weighted_rows.reshape(n_states, -1)).view(n_states + 1, *weighted_rows.shape[1:])
        elif agreed:
            moved = torch.cat([_forward(weighted_rows, steps[step]), weighted_rows.sum(0, keepdim=True)])
        else:
            moved = torch.cat([torch.einsum("jim,jkm->kim", weighted_rows, steps[step]),
                               weighted_rows.sum(0, keepdim=True)])
        transfer = moved[:n_states].div_(moved[n_states:])
        totals.append(moved[n_states])
        if not agreed:
            highest = transfer.amax(1)
            agreed = bool(((highest - transfer.amin(1)) <= agreement * highest).all())
            if agreed:
                transfer = transfer[:, 0]
    log_scales = sum(total.log() for total in totals).view(n_states, n_chunks, n_seq)
    if agreed:
        transfer = transfer.unsqueeze(1).expand(n_states, n_states, width)
    transfer = transfer.reshape(n_states, n_states, n_chunks, n_seq)

    # 2. and 3. Across chunks, in log space: a start state can be far less likely than another.
    for chunk in range(n_chunks - 1):
        logits = starts[:, chunk].log() + log_scales[:, chunk]
        weights = (logits - logits.amax(0)).clamp_min_(floor).exp_()
        following = (transfer[:, :, chunk] * weights).sum(1)
        starts[:, chunk + 1] = following.div_(following.sum(0))
    for chunk in range(n_chunks - 1, 0, -1):
        logits = (transfer[:, :, chunk] * ends[:, chunk].unsqueeze(1)).sum(0).log_()
        logits.add_(log_scales[:, chunk])
        ends[:, chunk - 1] = logits.sub_(logits.amax(0)).clamp_min_(floor).exp_()
    return starts, ends


def _forward(rows: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    """Distributions over states (K, M) moved one step by a (K, K) matrix or by per-column
    (K, K, M) matrices."""
    if trans.dim() == 2:
        return trans.T @ rows
    return (rows.unsqueeze(1) * trans).sum(0)


def _backward(trans: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Messages over states (K, ...) times the (K, K) or per-column (K, K, ...) matrices of
    their step."""
    if trans.dim() == 2:
        return (trans @ columns.reshape(columns.shape[0], -1)).view(columns.shape)
    return (trans * columns.unsqueeze(0)).sum(1)


def viterbi(log_pi0: torch.Tensor, log_trans: torch.Tensor, log_likes: torch.Tensor,
            mask: torch.Tensor) -> torch.Tensor:
    """(N, Tmax) most likely state paths, -1 in the padding.

    Max-sum messages run backward and the path is read forward, like ssm's, so that ties
    resolve the same way: to the lowest state index.
    """
    n_steps, n_seq = mask.shape
    log_matrix = _step_major((log_trans.exp() + VITERBI_EPS).log())
    likes = log_likes.permute(1, 2, 0)
    valid = mask

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
