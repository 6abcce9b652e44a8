"""Sequences of unequal length, padded into one batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import torch

from bnet.errors import DataError


class ARHMMDataError(DataError, ValueError):
    """Sequences an ARHMM cannot use; the message names the sequence at fault."""


@dataclass(frozen=True)
class SequenceBatch:
    """N sequences padded to (N, Tmax, D), with what the AR model needs precomputed.

    Attributes:
        x: observations, zero after each sequence's end.
        lengths: (N,) frames per sequence.
        mask: (N, Tmax) True on real frames.
        lags: the AR order the batch was built for.
        design: (N, Tmax, D*lags + 1) regressors [x_{t-1}, ..., x_{t-lags}, 1]; zero where
            a lag reaches before the start.
        ar_mask: (N, Tmax) True on real frames with t >= lags, the frames the AR
            dynamics score (earlier ones are scored by N(0, I)).
    """

    x: torch.Tensor
    lengths: torch.Tensor
    mask: torch.Tensor
    lags: int
    design: torch.Tensor
    ar_mask: torch.Tensor

    @classmethod
    def from_sequences(
        cls,
        sequences: Sequence[np.ndarray | torch.Tensor],
        lags: int,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> SequenceBatch:
        """Validate and pad a list of (T_n, D) arrays.

        Raises:
            ARHMMDataError: no sequences, a sequence that is not 2-D, dimensions that differ,
                non-finite values, or a sequence with no more than ``lags`` frames.
        """
        if isinstance(sequences, (np.ndarray, torch.Tensor)) or len(sequences) == 0:
            raise ARHMMDataError("expected a non-empty list of (frames, dimensions) arrays")
        tensors = [torch.as_tensor(seq).to(device=device, dtype=dtype) for seq in sequences]
        for index, seq in enumerate(tensors):
            if seq.ndim != 2:
                raise ARHMMDataError(
                    f"sequence {index} has shape {tuple(seq.shape)}; expected (frames, dimensions)")
        n_dims = tensors[0].shape[1]
        for index, seq in enumerate(tensors):
            if seq.shape[1] != n_dims:
                raise ARHMMDataError(
                    f"sequence {index} has {seq.shape[1]} dimensions; sequence 0 has {n_dims}")
            if seq.shape[0] <= lags:
                raise ARHMMDataError(
                    f"n_arhmm_lags={lags} needs sequences longer than {lags} frames, "
                    f"but sequence {index} has {seq.shape[0]}")
            if not torch.isfinite(seq).all():
                raise ARHMMDataError(f"sequence {index} contains NaN or infinite values")
        lengths = torch.tensor([seq.shape[0] for seq in tensors], device=device)
        x = torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True)
        frames = torch.arange(x.shape[1], device=device)
        mask = frames < lengths[:, None]
        return cls(x=x, lengths=lengths, mask=mask, lags=lags,
                   design=lagged_design(x, lags), ar_mask=mask & (frames >= lags))

    def to(self, dtype: torch.dtype, device: torch.device | str) -> SequenceBatch:
        return replace(self, x=self.x.to(dtype=dtype, device=device), lengths=self.lengths.to(device),
                       mask=self.mask.to(device), design=self.design.to(dtype=dtype, device=device),
                       ar_mask=self.ar_mask.to(device))

    @property
    def n_sequences(self) -> int:
        return self.x.shape[0]

    @property
    def n_dims(self) -> int:
        return self.x.shape[2]

    @property
    def n_frames(self) -> int:
        return int(self.lengths.sum())

    @cached_property
    def time_mask(self) -> torch.Tensor:
        """(Tmax, N) ``mask`` time-major, the layout of the engine's (K, Tmax, N) tensors."""
        return self.mask.T.contiguous()

    @cached_property
    def ar_time_mask(self) -> torch.Tensor:
        """(Tmax, N) ``ar_mask`` time-major."""
        return self.ar_mask.T.contiguous()

    @cached_property
    def centre(self) -> torch.Tensor:
        """(D*L + 1 + D,) the mean real frame in every lag block and the target, 0 for the
        bias: what ``regression_rows`` are taken about, so that float32 keeps the precision
        of what varies when the data sit far from 0."""
        mean = self.x[self.mask].double().mean(0).to(self.x.dtype)
        return torch.cat([mean.repeat(self.lags), mean.new_zeros(1), mean])

    @cached_property
    def regression_rows(self) -> torch.Tensor:
        """(Tmax*N, D*L + 1 + D) every frame's regressors, then its target, minus ``centre``:
        one row per frame, time-major (row t*N + n), so that products with them come out in
        the engine's (K, Tmax, N) layout, and blocks of frames are contiguous."""
        frames = torch.cat([self.design, self.x], dim=-1).transpose(0, 1)
        return (frames - self.centre).reshape(-1, frames.shape[-1])

    def unpad(self, padded: torch.Tensor) -> list[torch.Tensor]:
        """Split a (N, Tmax, ...) tensor back into per-sequence tensors."""
        return [padded[n, :length] for n, length in enumerate(self.lengths.tolist())]


def lagged_design(x: torch.Tensor, lags: int) -> torch.Tensor:
    """(N, T, D) -> (N, T, D*lags + 1): x_{t-1}, ..., x_{t-lags} side by side, then a 1."""
    n_seq, n_steps, _ = x.shape
    shifted = [torch.nn.functional.pad(x[:, :n_steps - lag], (0, 0, lag, 0)) for lag in range(1, lags + 1)]
    return torch.cat(shifted + [x.new_ones(n_seq, n_steps, 1)], dim=-1)
