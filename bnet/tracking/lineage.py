"""Walking a run's ``bnet.upstream.*`` tags back to the data it came from."""

from __future__ import annotations

from dataclasses import dataclass

from bnet.tracking import conventions as tags
from bnet.tracking.query import RunSummary, get_run
from bnet.tracking.store import Store, resolve_store


@dataclass
class LineageStep:
    run: RunSummary
    depth: int
    via: str  # the tag that led here ("" for the starting run)


def lineage(run_id: str, store: Store | None = None) -> list[LineageStep]:
    """The run and every upstream run it names, depth first (each run once)."""
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
