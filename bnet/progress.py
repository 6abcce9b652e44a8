"""Progress of long work: a tqdm bar where a terminal is attached, plain lines elsewhere
(a log file, CI), so logs stay readable and terminals stay quiet; and where the Python API's
lines go when the caller names no ``echo``."""

from __future__ import annotations

import logging
import sys
from typing import Callable

Echo = Callable[[str], None]
"""Where a function reports what it does, one line at a time (the CLI passes ``click.echo``)."""

LOGGER = logging.getLogger("bnet")


def say(line: str) -> None:
    """The Python API's default ``echo``: an INFO record on logger ``bnet``. Unless the
    application configured logging itself, it is shown on stderr as it is;
    ``logging.getLogger("bnet").setLevel(logging.WARNING)`` silences it."""
    if not LOGGER.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOGGER.addHandler(handler)
        LOGGER.propagate = False
        if LOGGER.level == logging.NOTSET:
            LOGGER.setLevel(logging.INFO)
    LOGGER.info(line)


class Progress:
    """``count`` of ``total`` steps (epochs, EM iterations, frames).

    On a terminal a bar with the latest message beside it; elsewhere a line
    ``"{description} {count}/{total}  {message}"`` at the first and last step and at each
    tenth of the way (every step when there are at most 20).
    """

    def __init__(self, total: int | None, description: str, echo: Callable[[str], None], unit: str = "step",
                 terminal: bool | None = None):
        self.total, self.description, self.echo = total, description, echo
        self.count, self.next_line = 0, 0.0
        self.bar = None
        if sys.stderr.isatty() if terminal is None else terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=description.strip(), unit=unit, leave=False, file=sys.stderr)

    def update(self, n: int = 1, message: str = "", at: int | None = None) -> None:
        """Advance ``n`` steps (or to step ``at``) and show ``message`` with them."""
        previous = self.count
        self.count = at if at is not None else self.count + n
        if self.bar is not None:
            self.bar.update(self.count - previous)
            if message:
                self.bar.set_postfix_str(message, refresh=False)
            return
        total = self.total
        if not total or total <= 20 or self.count == total or previous == 0 or self.count >= self.next_line:
            self.echo(f"{self.description} {self.count}" + (f"/{total}" if total else "") + (f"  {message}" if message else ""))
        if total:
            self.next_line = (self.count // (total / 10) + 1) * (total / 10)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
