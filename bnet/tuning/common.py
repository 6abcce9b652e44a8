"""Inputs every family reads the same way: the session file, its splits, upstream runs."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bnet.config import dataclass_from_values
from bnet.data.exports import read_export
from bnet.data.session import Session, trial_name
from bnet.data.sessions import session_slug, wants_several
from bnet.data.splits import TrialSplits, split_trials
from bnet.errors import ConfigError, DataError
from bnet.tracking import conventions as tags
from bnet.tracking.query import RunSummary
from bnet.tracking.registry import download_artifact, resolve_upstream
from bnet.tracking.store import Store
from bnet.training import ComputeConfig, TrainingConfig

SPLIT_KEYS = ("trial_splits", "rng_seed_data", "train_frac")


def training_configs(hparams: dict[str, Any]) -> tuple[TrainingConfig, ComputeConfig]:
    """How a gradient-trained trial fits, and where, from its hyperparameters (validated)."""
    training = dataclass_from_values(TrainingConfig, hparams)
    training.validate()
    compute = dataclass_from_values(ComputeConfig, hparams)
    compute.validate()
    return training, compute


def resolve_data_path(values: dict[str, Any], data: str | Path | None) -> Path:
    """``--data``, else ``data``, else BehaveNet's ``data_dir/lab/expt/animal/session``."""
    if not data and wants_several(values):
        raise ConfigError("sessions_csv and 'all' sessions are for autoencoders (bnet tune ae); later stages fit "
                          "one session each: pass --data PATH or name one session")
    if data:
        return Path(data)
    if values.get("data"):
        return Path(values["data"])
    keys = ("data_dir", "lab", "expt", "animal", "session")
    if all(values.get(k) for k in keys):
        return Path(*(str(values[k]) for k in keys)) / "data.hdf5"
    if all(values.get(k) for k in keys[1:]):
        from bnet.data.catalog import lookup

        return lookup(*(values[k] for k in keys[1:])).path
    raise ConfigError("no data: pass --data PATH, or set data (or data_dir/lab/expt/animal/session, or "
                      "lab/expt/animal/session recorded by bnet data add)")


def split_settings(values: dict[str, Any]) -> dict[str, Any]:
    """BehaveNet's split keys with their defaults, typed."""
    return {"trial_splits": str(values.get("trial_splits", "8;1;1;0")),
            "rng_seed_data": int(values.get("rng_seed_data", 0)),
            "train_frac": float(values.get("train_frac", 1.0))}


def session_splits(session: Session, values: dict[str, Any]) -> TrialSplits:
    return split_trials(session.trials, **split_settings(values), source=str(session.path))


def upstream_run(family: str, reference: str | None, experiment: str | None, session: Session,
                 store: Store) -> RunSummary:
    """The ``family`` run a downstream study reads: ``best`` is the best run *fitted to this
    session file* (by the metric its study optimised), else a run id or registry URI, which
    must have been fitted to this file too."""
    run = resolve_upstream(reference or "best", family, experiment, data_hash=session.data_hash, store=store)
    recorded = run.tags.get(tags.TAG_DATA_HASH)
    if recorded != session.data_hash and session.data_hash not in run.tags.get(tags.TAG_SESSION_HASHES, "").split(","):
        raise DataError(f"{session.path}: {family} run {run.run_id} was fitted to other data "
                        f"(data hash {recorded}, this file {session.data_hash})")
    return run


def session_export_name(run: RunSummary, base: str, session: Session) -> str:
    """The file a run exported ``base`` (latents, states) of one session to: per-session
    names for multi-session fits (:func:`bnet.data.sessions.export_name`)."""
    if session.data_hash in run.tags.get(tags.TAG_SESSION_HASHES, "").split(","):
        return f"{base}.{session_slug(session)}.hdf5"
    return f"{base}.hdf5"


def upstream_export(run: RunSummary, name: str, group: str, session: Session,
                    store: Store) -> tuple[dict[int, np.ndarray], TrialSplits] | None:
    """An upstream run's ``exports/<name>.hdf5`` group for every trial of the session, with
    the splits it was fitted on; None if the run exported nothing."""
    with tempfile.TemporaryDirectory() as tmp:
        path = download_artifact(run, f"{tags.EXPORTS_DIR}/{session_export_name(run, name, session)}", tmp, store)
        if path is None:
            return None
        values, splits = read_export(path, group)
    missing = sorted(set(session.trials) - set(values))
    if missing:
        raise DataError(f"{run.family} run {run.run_id}: its {group} lack {trial_name(missing[0])} of {session.path}")
    return values, splits


def refuse_other_splits(values: dict[str, Any], upstream: RunSummary) -> None:
    """Downstream studies use their upstream run's splits; a split key the user set that
    disagrees with them is an error, not a silently dropped value."""
    theirs = split_settings(upstream.params)
    ours = split_settings(values)
    differing = [k for k in SPLIT_KEYS if k in values and str(ours[k]) != str(theirs[k])]
    if differing:
        listed = ", ".join(f"{k} {ours[k]} (the run's {theirs[k]})" for k in differing)
        raise ConfigError(f"the splits come from {upstream.family} run {upstream.run_id}, whose trials this study "
                          f"reads: {listed}; remove {', '.join(differing)} from the config")
