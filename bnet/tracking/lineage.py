"""Walking a run's ``bnet.upstream.*`` tags back to the data it came from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bnet.errors import TrackingError
from bnet.tracking import conventions as tags
from bnet.tracking.query import RunSummary, get_run
from bnet.tracking.store import Store, resolve_store


@dataclass
class LineageStep:
    run: RunSummary
    depth: int
    via: str  # the tag that led here ("" for the starting run)


def run_of_file(path: str | Path) -> str:
    """The run that wrote an output file (its ``run_id`` attribute: every export and every
    ``bnet apply`` output carries one)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            run_id = f.attrs.get("run_id")
    except OSError as err:
        raise TrackingError(f"{path}: not an HDF5 file written by a run ({err})") from None
    if not run_id:
        raise TrackingError(f"{path}: names no run (no run_id attribute): not written by a bnet run")
    return str(run_id)


def lineage(run_id: str, store: Store | None = None) -> list[LineageStep]:
    """The run (or the run that wrote a file) and every upstream run it names, depth first
    (each run once)."""
    if Path(run_id).is_file():
        run_id = run_of_file(run_id)
    store = store or resolve_store()
    steps: list[LineageStep] = []
    seen: set[str] = set()

    def visit(current: str, depth: int, via: str) -> None:
        if current in seen:
            return
        seen.add(current)
        run = get_run(current, store)
        steps.append(LineageStep(run, depth, via))
        upstream = sorted((k, v) for k, v in run.tags.items() if k.startswith(tags.UPSTREAM_TAG_PREFIX))
        for key, value in upstream:
            visit(value, depth + 1, key[len(tags.UPSTREAM_TAG_PREFIX):])
        for member in run.tags.get("bnet.ensemble.members", "").split(","):
            if member and member not in seen:
                visit(member, depth + 1, "member")

    visit(run_id, 0, "")
    return steps
