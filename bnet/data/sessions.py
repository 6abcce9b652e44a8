"""Several sessions fitted by one model: BehaveNet's ``sessions_csv`` and ``all`` keyword.

A multi-session fit reads a :class:`SessionGroup` where a single-session fit reads a
:class:`~bnet.data.session.Session`; the group answers the same questions (``path``,
``dataset_id``, ``data_hash``) so runs record and scope it the same way, and lists its
members so each session's exports get a name of their own.

Selection follows BehaveNet:

* ``sessions_csv``: a CSV with columns ``lab,expt,animal,session`` (extra columns such as
  ``save_dir`` ignored), one row per session, in the order that becomes each session's index;
  it takes precedence over the ``lab/expt/animal/session`` keys.
* ``all`` at the ``expt``, ``animal`` or ``session`` level: every session below the levels
  named before it; the first ``all`` from the top wins and the levels below it are ignored
  (``lab: all`` is refused, as in BehaveNet).
* ``all_source``: ``data`` looks for sessions under ``data_dir`` (a session is a folder
  holding ``data.hdf5``); ``save`` takes the sessions that runs in the tracking store were
  already fitted to (BehaveNet's ``save_dir``), that still exist under ``data_dir``.
"""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from bnet.data.session import Session, open_session
from bnet.errors import ConfigError, DataError

LEVELS = ("lab", "expt", "animal", "session")
ALL = "all"


@dataclass(frozen=True)
class SessionGroup:
    """Sessions fitted together, in the order that gives each its index.

    Attributes:
        sessions: the members.
        path: where the selection came from (the ``sessions_csv`` file or ``data_dir``).
    """

    sessions: tuple[Session, ...]
    path: Path

    @property
    def dataset_id(self) -> str:
        ids = [s.dataset_id for s in self.sessions]
        joined = "+".join(ids)
        return joined if len(joined) <= 250 else f"{ids[0]} +{len(ids) - 1} sessions"

    @property
    def data_hash(self) -> str:
        """The group's identity: the members' hashes in order (a different order is a
        different model: session indices pick the session-specific layers)."""
        return hashlib.sha256("\n".join(s.data_hash for s in self.sessions).encode()).hexdigest()[:16]

    @property
    def session_hashes(self) -> str:
        return ",".join(s.data_hash for s in self.sessions)

    @property
    def image_shape(self):
        return self.sessions[0].image_shape

    @property
    def n_labels(self):
        return self.sessions[0].n_labels


def members(data: Session | SessionGroup) -> tuple[Session, ...]:
    """The sessions a fit reads: one, or a group's members."""
    return data.sessions if isinstance(data, SessionGroup) else (data,)


def session_slug(session: Session) -> str:
    """A session's name in file names: ``lab_expt_animal_session``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", session.dataset_id.replace("/", "_")).strip("_")


def export_name(base: str, session: Session, data: Session | SessionGroup) -> str:
    """The export file of one session of a fit: ``latents.hdf5`` for a single-session fit,
    ``latents.<lab_expt_animal_session>.hdf5`` for each member of a group (BehaveNet wrote
    every session's exports to one file name when given one, so the last session won)."""
    if isinstance(data, SessionGroup):
        return f"{base}.{session_slug(session)}.hdf5"
    return f"{base}.hdf5"


def wants_several(values: dict[str, Any]) -> bool:
    """Whether the config selects sessions by ``sessions_csv`` or the ``all`` keyword."""
    return bool(values.get("sessions_csv")) or any(values.get(level) == ALL for level in LEVELS)


def select_sessions(values: dict[str, Any], require: tuple[str, ...],
                    fitted_sessions: Callable[[], Iterable[str]] | None = None) -> SessionGroup:
    """The group a config's ``sessions_csv`` or ``all`` keyword selects, each member validated.

    Args:
        values: the config's values (``data_dir``, ``sessions_csv``, the levels, ``all_source``).
        require: signal groups every member must hold.
        fitted_sessions: for ``all_source: save``, the ``lab/expt/animal/session`` ids that
            runs in the store were fitted to.
    """
    data_dir = values.get("data_dir")
    if not data_dir:
        raise ConfigError("sessions_csv and 'all' sessions need data_dir (sessions live at "
                          "data_dir/lab/expt/animal/session/data.hdf5)")
    data_dir = Path(str(data_dir))
    if values.get("sessions_csv"):
        source = Path(str(values["sessions_csv"]))
        ids = _read_sessions_csv(source)
    else:
        source = data_dir
        ids = _expand_all(values, data_dir, fitted_sessions)
    if len(ids) != len(set(ids)):
        twice = next(i for i in ids if ids.count(i) > 1)
        raise ConfigError(f"{source}: session {'/'.join(twice)} is listed twice")
    sessions = []
    for parts in ids:
        path = data_dir.joinpath(*parts) / "data.hdf5"
        if not path.exists():
            raise DataError(f"{source}: session {'/'.join(parts)} has no data file at {path}")
        # named by where it was found: the selection's ids, whatever the file's attributes say
        sessions.append(replace(open_session(path, require=require), dataset_id="/".join(parts)))
    _check_alike(sessions)
    return SessionGroup(tuple(sessions), source.absolute())


def _read_sessions_csv(path: Path) -> list[tuple[str, ...]]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
            header = rows and list(rows[0]) or []
    except OSError as err:
        raise ConfigError(f"{path}: cannot read sessions_csv ({err.strerror})") from None
    if not rows:
        raise ConfigError(f"{path}: sessions_csv lists no sessions (expected a header lab,expt,animal,session "
                          f"and one row per session)")
    missing = [c for c in LEVELS if c not in header]
    if missing:
        raise ConfigError(f"{path}: sessions_csv lacks column(s) {', '.join(missing)} (has {', '.join(header)})")
    ids = []
    for line, row in enumerate(rows, start=2):
        parts = tuple((row[c] or "").strip() for c in LEVELS)
        if not all(parts):
            raise ConfigError(f"{path}, line {line}: every session needs lab, expt, animal and session")
        ids.append(parts)
    return ids


def _expand_all(values: dict[str, Any], data_dir: Path,
                fitted_sessions: Callable[[], Iterable[str]] | None) -> list[tuple[str, ...]]:
    named = []
    for level in LEVELS:
        value = values.get(level)
        if value == ALL:
            break
        if not value:
            raise ConfigError(f"'{LEVELS[len(named) + 1] if len(named) + 1 < len(LEVELS) else level}: all' "
                              f"needs {level} set above it")
        named.append(str(value))
    if not named:
        raise ConfigError("'lab: all' is refused (as in BehaveNet): name the lab, and use 'all' at the "
                          "expt, animal or session level")
    source = str(values.get("all_source", "data"))
    if source == "data":
        found = sorted(tuple(p.parent.relative_to(data_dir).parts)
                       for p in data_dir.joinpath(*named).glob("/".join(["*"] * (4 - len(named))) + "/data.hdf5"))
    elif source == "save":
        if fitted_sessions is None:
            raise ConfigError("all_source: save needs the tracking store")
        prefix = "/".join(named) + "/"
        found = sorted({tuple(i.split("/")) for i in fitted_sessions() if i.startswith(prefix) and i.count("/") == 3})
    else:
        raise ConfigError(f"all_source must be data or save, got '{source}'")
    if not found:
        where = data_dir.joinpath(*named) if source == "data" else "the tracking store's runs"
        raise DataError(f"no sessions under {'/'.join(named)}/{'/'.join(['*'] * (4 - len(named)))} "
                        f"(all_source {source}: looked in {where})")
    return found


def _check_alike(sessions: list[Session]) -> None:
    first = sessions[0]
    for session in sessions[1:]:
        if session.image_shape != first.image_shape:
            raise DataError(f"{session.path}: frames are {session.image_shape} (C, Y, X) but {first.path} has "
                            f"{first.image_shape}; sessions fitted together need one frame shape")
        if session.n_labels != first.n_labels:
            raise DataError(f"{session.path}: {session.n_labels} labels but {first.path} has {first.n_labels}")
