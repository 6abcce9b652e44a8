"""What every family's `bnet tune` does before its study starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from bnet.config import ProjectConfig, TuningConfig
from bnet.data.session import Session
from bnet.errors import ConfigError, DataError
from bnet.tracking import conventions as tags
from bnet.tracking.query import RunSummary
from bnet.tuning import space


def apply_options(config: ProjectConfig, tuning_options: dict[str, Any], fixed_options: dict[str, Any]) -> TuningConfig:
    """CLI/API options over the config: tuning fields and fixed hyperparameters (None = keep)."""
    config.override(**fixed_options)
    tuning = config.tuning
    for name, value in tuning_options.items():
        if value is not None:
            setattr(tuning, name, value)
    tuning.validate()
    return tuning


def resolve_experiment(experiment: str | None, config: ProjectConfig) -> str:
    experiment = experiment or config.experiment
    if not experiment:
        raise ConfigError("no experiment name: pass --experiment NAME or set experiment in the config")
    return experiment


def resolve_data_path(values: dict[str, Any], data: str | Path | None) -> Path:
    """``--data``, else ``data``, else BehaveNet's ``data_dir/lab/expt/animal/session``."""
    if data:
        return Path(data)
    if values.get("data"):
        return Path(values["data"])
    keys = ("data_dir", "lab", "expt", "animal", "session")
    if all(values.get(k) for k in keys):
        return Path(*(str(values[k]) for k in keys)) / "data.hdf5"
    raise ConfigError("no data: pass --data PATH, or set data (or data_dir/lab/expt/animal/session)")


def session_tags(session: Session) -> dict[str, str]:
    """The tags that tie every run of a study to its session file."""
    return {tags.TAG_DATASET: session.dataset_id, tags.TAG_DATA_HASH: session.data_hash,
            tags.TAG_DATA_PATH: str(session.path)}


def check_same_data(upstream: RunSummary, session: Session) -> None:
    """An upstream run must have been fitted to this very file (its data hash)."""
    recorded = upstream.tags.get(tags.TAG_DATA_HASH)
    if recorded != session.data_hash:
        raise DataError(f"{session.path}: {upstream.family} run {upstream.run_id} was fitted to other data "
                        f"(data hash {recorded}, this file {session.data_hash})")


def check_every_choice(config: ProjectConfig, check: Callable[[dict[str, Any]], None]) -> None:
    """Run ``check`` on a representative point and on every categorical choice, so a bad
    value anywhere in the space fails before the first run is created."""
    dimensions, fixed = config.dimensions(), config.fixed()
    base = {**fixed, **space.first_values(dimensions)}
    check(base)
    for key, dim in dimensions.items():
        for choice in getattr(dim, "choices", ()):
            check({**base, key: choice})
