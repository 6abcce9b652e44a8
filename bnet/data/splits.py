"""Train/val/test splits over trials, with BehaveNet's semantics.

Trials are cut into blocks of ``train;gap;val;gap;test;gap`` trials; blocks are shuffled by
``rng_seed_data`` and the few trials that do not fill a block are dropped (their position is
drawn at random too). So 100 trials with "8;1;1;0" give 80/10/10 and 10 or 11 trials give
8/1/1; fewer trials than one block is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnet.errors import ConfigError, DataError

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class TrialSplits:
    """Trial indices (as named in the file) of each split."""

    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]

    def __getitem__(self, name: str) -> tuple[int, ...]:
        if name not in SPLIT_NAMES:
            raise KeyError(name)
        return getattr(self, name)

    def as_dict(self) -> dict[str, list[int]]:
        return {name: list(self[name]) for name in SPLIT_NAMES}


def parse_trial_splits(spec: str) -> tuple[int, int, int, int]:
    """Parse ``"train;val;test;gap"`` block sizes."""
    parts = str(spec).split(";")
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        sizes = ()
    if len(sizes) != 4 or min(sizes) < 0 or min(sizes[:3]) < 1:
        raise ConfigError(
            f"trial_splits '{spec}' must be four non-negative integers 'train;val;test;gap' "
            f"with at least one trial in each of train, val and test (e.g. '8;1;1;0')"
        )
    return sizes  # type: ignore[return-value]


def split_trials(
    trials: tuple[int, ...] | list[int],
    trial_splits: str = "8;1;1;0",
    rng_seed_data: int = 0,
    train_frac: float = 1.0,
    source: str = "data",
) -> TrialSplits:
    """Assign trials to train/val/test.

    Args:
        trials: the trial indices present in the session, ascending.
        trial_splits: ``"train;val;test;gap"`` trials per block.
        rng_seed_data: seed of the block shuffle and of ``train_frac`` subsampling.
        train_frac: a fraction (<= 1) of the training trials to keep, or (> 1) a count.
        source: what the trials came from, for error messages.
    """
    n_train, n_val, n_test, n_gap = parse_trial_splits(trial_splits)
    per_block = n_train + n_val + n_test + 3 * n_gap
    n_trials = len(trials)
    n_blocks = n_trials // per_block
    if n_blocks == 0:
        raise DataError(
            f"{source}: {n_trials} trials are fewer than one block of trial_splits "
            f"'{trial_splits}' needs ({per_block})"
        )
    rng = np.random.RandomState(rng_seed_data)
    leftover = n_trials - per_block * n_blocks
    offset = rng.randint(0, leftover) if leftover > 0 else 0
    chosen: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    for block in rng.permutation(n_blocks):
        start = int(block) * per_block + offset
        for name, size in (("train", n_train), ("val", n_val), ("test", n_test)):
            chosen[name].extend(range(start, start + size))
            start += size + n_gap

    train = chosen["train"]
    if train_frac != 1.0:
        if train_frac <= 0:
            raise ConfigError(f"train_frac must be positive, got {train_frac}")
        keep = int(np.floor(train_frac * len(train))) if train_frac < 1 else int(train_frac)
        if keep < 1 or keep > len(train):
            raise ConfigError(
                f"train_frac {train_frac} keeps {keep} of {len(train)} training trials"
            )
        train = sorted(rng.choice(train, size=keep, replace=False).tolist())

    index = list(trials)
    return TrialSplits(
        train=tuple(index[i] for i in sorted(train)),
        val=tuple(index[i] for i in sorted(chosen["val"])),
        test=tuple(index[i] for i in sorted(chosen["test"])),
    )
