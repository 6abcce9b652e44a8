"""A throwaway PostgreSQL server in a folder, from Debian's (or any) PostgreSQL binaries.

For trying many workers on one machine (``bnet postgres DIR``), for the tests and for the
benchmarks: no system service, listening on 127.0.0.1 only, trust authentication.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
from pathlib import Path

from bnet.errors import BnetError


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
            self._run(f"{self.bin_dir}/initdb", "-D", str(self.root / "data"), "-U", "postgres",
                      "--auth-local=trust", "--auth-host=trust", "-E", "UTF8")
        self._pg_ctl("-o", f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root}"
                     " -c max_connections=200", "start")
        return self

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "stop")

    def restart(self) -> None:
        self._pg_ctl("-m", "fast", "restart")

    def create_database(self, name: str) -> str:
        """Create database ``name`` (if new) and return its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as connection:
            exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                connection.execute(f'CREATE DATABASE "{name}"')
        return f"{self.url}/{name}"
