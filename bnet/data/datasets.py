"""Torch datasets over a session's trials.

Each item is one batch: a whole trial (BehaveNet's default) or a fixed chunk of
consecutive frames, so models with temporal context see contiguous frames and the
training loop needs no collation. Images come out as float32 in [0, 1].
"""

from __future__ import annotations

import math

import h5py
import numpy as np
import torch

from bnet.data.session import Session, trial_name
from bnet.errors import ConfigError

PRELOAD_LIMIT_BYTES = 2 << 30
"""Splits smaller than this are read into memory once; larger ones are read per batch."""


class TrialBatches(torch.utils.data.Dataset):
    """Batches of one split of a session.

    Args:
        session: a validated session.
        trials: the trial indices to serve (one split).
        signals: signal groups to return, e.g. ``("images", "masks")``.
        chunk_size: frames per batch; None serves whole trials.
    """

    def __init__(
        self,
        session: Session,
        trials: tuple[int, ...] | list[int],
        signals: tuple[str, ...] = ("images",),
        chunk_size: int | None = None,
    ):
        if chunk_size is not None and chunk_size < 1:
            raise ConfigError(f"batch_size must be a positive number of frames, got {chunk_size}")
        self.session = session
        self.trials = tuple(trials)
        self.signals = signals
        lengths = dict(zip(session.trials, session.n_frames))
        self.index: list[tuple[int, int, int]] = []
        for trial in self.trials:
            n = lengths[trial]
            step = chunk_size or n
            self.index.extend((trial, start, min(start + step, n)) for start in range(0, n, step))
        self.n_frames = sum(lengths[t] for t in self.trials)
        self._cache: dict[tuple[str, int], np.ndarray] | None = None
        self._file: h5py.File | None = None
        if self._split_bytes() <= PRELOAD_LIMIT_BYTES:
            self._cache = {}
            for signal in signals:
                for trial, data in zip(self.trials, session.read_all(signal, list(self.trials))):
                    self._cache[(signal, trial)] = data

    def _split_bytes(self) -> int:
        per_frame = 0
        if "images" in self.signals and self.session.image_shape:
            per_frame += int(np.prod(self.session.image_shape))
        if "masks" in self.signals and self.session.image_shape:
            per_frame += int(np.prod(self.session.image_shape)) * self.session.masks_itemsize
        return per_frame * self.n_frames

    def __len__(self) -> int:
        return len(self.index)

    def _slice(self, signal: str, trial: int, start: int, stop: int) -> np.ndarray:
        if self._cache is not None:
            return self._cache[(signal, trial)][start:stop]
        if self._file is None:
            self._file = h5py.File(self.session.path, "r")
        return self._file[signal][trial_name(trial)][start:stop]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        trial, start, stop = self.index[i]
        batch = {}
        for signal in self.signals:
            data = torch.from_numpy(np.ascontiguousarray(self._slice(signal, trial, start, stop)))
            batch[signal] = data.float().div_(255.0) if signal == "images" else data.float()
        return batch

    def trial_batches(self, trial: int) -> list[dict[str, torch.Tensor]]:
        """All batches of one trial, in frame order (for exporting per-trial outputs)."""
        return [self[i] for i, (t, _, _) in enumerate(self.index) if t == trial]


class SessionBatches(torch.utils.data.Dataset):
    """Batches of several sessions' splits, each tagged with its session's index
    (``batch["session"]``, one entry per frame) for session-specific layers and losses.

    Args:
        per_session: one :class:`TrialBatches` per session, in session-index order.
        mix: sessions per batch; 1 serves each session's batches as they are, k > 1
            concatenates batches of k different sessions (``msps-vae``'s training batches),
            each session's batches used in turn so every one is seen once per epoch.
    """

    def __init__(self, per_session: list[TrialBatches], mix: int = 1):
        if mix > len(per_session):
            raise ConfigError(f"n_sessions_per_batch is {mix} but only {len(per_session)} sessions are fitted")
        self.per_session = per_session
        self.n_frames = sum(b.n_frames for b in per_session)
        items = [(s, i) for s, batches in enumerate(per_session) for i in range(len(batches))]
        if mix == 1:
            self.index = [[item] for item in items]
            return
        n_batches = math.ceil(len(items) / mix)
        cursor = [0] * len(per_session)
        self.index = []
        for j in range(n_batches):
            group = []
            for m in range(mix):
                s = (j * mix + m) % len(per_session)
                group.append((s, cursor[s] % len(per_session[s])))
                cursor[s] += 1
            self.index.append(group)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        parts = []
        for s, j in self.index[i]:
            batch = self.per_session[s][j]
            n = next(iter(batch.values())).shape[0]
            parts.append({**batch, "session": torch.full((n,), s, dtype=torch.long)})
        if len(parts) == 1:
            return parts[0]
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
