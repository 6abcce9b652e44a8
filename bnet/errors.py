"""Errors a user can act on.

Anything raised as a :class:`BnetError` is the user's input at fault (a file, a group, a
trial, a config key, an option); the CLI prints its message and exits non-zero without a
traceback. Anything else is a bug in bnet and keeps its traceback.
"""


class BnetError(Exception):
    """A problem with the user's input, with a message that names what is at fault."""


class DataError(BnetError):
    """A session file (or a trial, group or dataset in it) that bnet cannot use."""


class ConfigError(BnetError):
    """A project config, search space or option that bnet cannot use."""


class TrackingError(BnetError):
    """A query against the tracking store that finds nothing usable."""
