"""A throwaway PostgreSQL server in a folder, from Debian's (or any) PostgreSQL binaries.

For trying many workers on one machine (``bnet postgres DIR``), for the tests and for the
benchmarks: no system service, listening on 127.0.0.1 only. On a shared login node every
local user reaches 127.0.0.1, so the cluster asks for a password (``scram-sha-256``, every
connection, local socket too): one generated when the cluster is created and kept in
``DIR/pgpass``, a libpq password file only its owner reads. The URLs name that file
(``?passfile=DIR/pgpass``), never the password.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
from pathlib import Path

from bnet.errors import BnetError
from bnet.tracking.secrets import store_password, with_passfile, write_private


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, seconds: float = 120.0) -> bool:
    """Whether something listens on 127.0.0.1:``port`` within ``seconds``."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.5)
    return False


def postgres_binaries() -> str | None:
    """The folder of ``initdb`` and ``pg_ctl`` (the newest installed), None if absent."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


class LocalPostgres:
    """A PostgreSQL cluster under ``root`` on 127.0.0.1:``port``."""

    def __init__(self, root: str | Path, port: int | None = None):
        self.bin_dir = postgres_binaries()
        if self.bin_dir is None:
            raise BnetError("no PostgreSQL server is installed (Debian: apt-get install postgresql)")
        self.root = Path(root).absolute()
        self.port = port or free_port()
        # initdb refuses to run as root: the cluster belongs to the postgres user then
        self.as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}"

    @property
    def passfile(self) -> Path:
        return self.root / "pgpass"

    def database_url(self, name: str) -> str:
        """The SQLAlchemy URL of database ``name``, naming the password file, not the password."""
        return with_passfile(f"{self.url}/{name}", self.passfile)

    def _run(self, *args: str) -> None:
        result = subprocess.run([*self.as_owner, *args], capture_output=True, text=True)
        if result.returncode:
            raise BnetError(f"{args[0]} failed: {(result.stderr or result.stdout).strip()[-500:]}")

    def _pg_ctl(self, *args: str) -> None:
        self._run(f"{self.bin_dir}/pg_ctl", "-D", str(self.root / "data"), "-l", str(self.root / "log"), "-w", *args)

    def start(self) -> "LocalPostgres":
        self.root.mkdir(parents=True, exist_ok=True)
        if self.as_owner:
            shutil.chown(self.root, "postgres")
        if not (self.root / "data").exists():
            self._create_cluster()
        elif not self.passfile.exists():
            raise BnetError(f"{self.root}: a cluster made by an older bnet, which trusted every local connection; "
                            f"start one in a new folder (it will ask for a password)")
        self._pg_ctl("-o", f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root}"
                     " -c max_connections=200", "start")
        return self

    def _create_cluster(self) -> None:
        """initdb with scram-sha-256 for every connection and a generated superuser password,
        written only to the owner's password file (initdb reads it from a file it deletes)."""
        password = secrets.token_urlsafe(24)
        store_password(self.passfile, "127.0.0.1", "*", "postgres", password)
        store_password(self.passfile, "localhost", "*", "postgres", password)
        handover = self.root / ".initdb-password"
        write_private(handover, password + "\n")
        if self.as_owner:
            shutil.chown(handover, "postgres")
        try:
            self._run(f"{self.bin_dir}/initdb", "-D", str(self.root / "data"), "-U", "postgres",
                      "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", f"--pwfile={handover}", "-E", "UTF8")
        finally:
            handover.unlink(missing_ok=True)

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "stop")

    def restart(self) -> None:
        self._pg_ctl("-m", "fast", "restart")

    def create_database(self, name: str) -> str:
        """Create database ``name`` (if new) and return its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True,
                             passfile=str(self.passfile)) as connection:
            exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                connection.execute(f'CREATE DATABASE "{name}"')
        return self.database_url(name)
