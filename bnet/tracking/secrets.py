"""Credentials in URLs: shown redacted, passed by name, kept in files only their user reads.

A storage or tracking URL may hold a password (``postgresql+psycopg://user:PASSWORD@host/db``,
or ``?password=`` in its query). bnet never prints, logs, tags or writes one: what it shows is
:func:`redact`'s ``user:***@host``; what it hands to a worker process or a Slurm script is the
name of a variable or of a password file (libpq's ``PGPASSFILE`` or ``passfile=``, MLflow's
``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``), never the value.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
SECRET_QUERY_KEYS = frozenset({"password", "passwd", "pwd", "token", "secret"})
# a URL with credentials anywhere in a text: scheme://user:password@
# (the password runs to the authority's last '@', as URL parsers read it)
_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<password>[^\s/?#]*)@"
                          r"(?=[^@\s/?#]*(?:[/?#\s]|$))")
_QUERY_SECRET = re.compile(r"(?P<key>[?&](?:%s)=)(?P<value>[^&\s]*)" % "|".join(SECRET_QUERY_KEYS), re.IGNORECASE)


def holds_password(url: str) -> bool:
    """Whether ``url`` carries a password (in its authority or its query)."""
    try:
        parts = urlsplit(url)
        return parts.password is not None or any(key.lower() in SECRET_QUERY_KEYS
                                                  for key, _ in parse_qsl(parts.query))
    except ValueError:  # not a URL (a path): nothing to hide
        return False


def redact(text: str) -> str:
    """``text`` with every URL password replaced by ``***`` (``user:***@host``, ``?password=***``)."""
    text = _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", str(text))
    return _QUERY_SECRET.sub(lambda m: f"{m['key']}{MASK}", text)


def write_private(path: str | Path, text: str) -> Path:
    """Write ``text`` to a file only its owner can read or write (created so, never widened)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        os.fchmod(file.fileno(), 0o600)
        file.write(text)
    return path


def _pgpass_escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace(":", "\\:")


def pgpass_key(host: str, port: int | str, user: str, database: str = "*") -> str:
    """The fields of a libpq password file line before the password (``host:port:database:user:``)."""
    return ":".join(_pgpass_escape(v) for v in (host, port, database, user)) + ":"


def with_passfile(url: str, passfile: str | Path) -> str:
    """A PostgreSQL URL whose password libpq reads from ``passfile`` (the URL names the file)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "passfile"]
    query.append(("passfile", str(passfile)))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query, safe="/"), parts.fragment))


def store_password(passfile: str | Path, host: str, port: int | str, user: str, password: str) -> Path:
    """Record ``password`` in a libpq password file (user-only; any older entry for this host,
    port and user replaced)."""
    key = pgpass_key(host, port, user)
    passfile = Path(passfile)
    existing = passfile.read_text().splitlines() if passfile.exists() else []
    kept = [line for line in existing if line and not line.startswith(key)]
    return write_private(passfile, "\n".join([*kept, key + _pgpass_escape(password)]) + "\n")
