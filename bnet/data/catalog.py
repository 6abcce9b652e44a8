"""The user's catalogue of datasets, as BehaveNet's ``add_dataset()`` kept it.

BehaveNet asked for a dataset's lab, experiment, animal, session, channels, pixels, frame
rate and neural type at a prompt and saved them in ``~/.behavenet``; ``bnet data add``
records the same in ``$BNET_HOME/datasets.json`` (default ``~/.bnet``), and a config that
names ``lab/expt/animal/session`` without ``data`` or ``data_dir`` finds its file there.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from bnet.errors import ConfigError, DataError

NEURAL_TYPES = ("spikes", "ca", "none")


@dataclass
class DatasetEntry:
    """One session in the catalogue (BehaveNet's dataset parameters).

    Attributes:
        lab, expt, animal, session: the session's names.
        data_dir: the folder above ``lab/expt/animal/session/data.hdf5``.
        n_input_channels, y_pixels, x_pixels: the frames.
        frame_rate: frames per second.
        neural_type: ``spikes``, ``ca`` (calcium) or ``none``.
        neural_bin_size: seconds per neural bin (informational, as in BehaveNet).
    """

    lab: str
    expt: str
    animal: str
    session: str
    data_dir: str
    n_input_channels: int
    y_pixels: int
    x_pixels: int
    frame_rate: float
    neural_type: str = "none"
    neural_bin_size: float | None = None

    @property
    def key(self) -> str:
        return "/".join((self.lab, self.expt, self.animal, self.session))

    @property
    def path(self) -> Path:
        return Path(self.data_dir, self.lab, self.expt, self.animal, self.session, "data.hdf5")


def catalog_path() -> Path:
    return Path(os.environ.get("BNET_HOME") or Path.home() / ".bnet") / "datasets.json"


def read_catalog() -> dict[str, DatasetEntry]:
    path = catalog_path()
    if not path.exists():
        return {}
    try:
        content = json.loads(path.read_text())
        return {key: DatasetEntry(**value) for key, value in content.items()}
    except (json.JSONDecodeError, TypeError, AttributeError) as err:
        raise ConfigError(f"{path}: not a bnet dataset catalogue ({err}); fix or remove it") from None


def add_dataset(entry: DatasetEntry, replace: bool = False) -> Path:
    """Record ``entry``; an existing entry of the same session is kept unless ``replace``."""
    if entry.neural_type not in NEURAL_TYPES:
        raise ConfigError(f"neural_type must be one of {', '.join(NEURAL_TYPES)}, got '{entry.neural_type}'")
    for name in ("n_input_channels", "y_pixels", "x_pixels"):
        if getattr(entry, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(entry, name)}")
    if entry.frame_rate <= 0:
        raise ConfigError(f"frame_rate must be positive, got {entry.frame_rate}")
    catalog = read_catalog()
    if entry.key in catalog and not replace and catalog[entry.key] != entry:
        raise ConfigError(f"{entry.key} is already in {catalog_path()} with other values (pass --replace)")
    catalog[entry.key] = entry
    path = catalog_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: asdict(v) for k, v in sorted(catalog.items())}, indent=2) + "\n")
    return path


def lookup(lab: str, expt: str, animal: str, session: str) -> DatasetEntry:
    key = "/".join(map(str, (lab, expt, animal, session)))
    catalog = read_catalog()
    if key not in catalog:
        raise DataError(f"no dataset {key} in {catalog_path()} (add it with bnet data add, or set data_dir)")
    return catalog[key]
