"""``bnet ui`` and ``bnet server``: the MLflow server over a store, for people and workers."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from bnet.cli.options import resolve, runs_link, store_option

LOOPBACK = ("127.0.0.1", "localhost", "::1")
ADMIN_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"
PERMISSIONS = ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")



@click.command()
@store_option
@click.option("--tracking-uri", default=None, envvar="BNET_TRACKING_URI", show_envvar=True,
              help="The runs database to serve [default the store's mlflow.db].")
@click.option("--port", default=5000, show_default=True)
def ui(store, tracking_uri, port):
    """Serve the MLflow UI for the store's runs (Ctrl-C or SIGTERM stops it and its workers)."""
    from bnet.tracking.query import experiment_links
    from bnet.tracking.secrets import redact

    resolved = resolve(store, tracking_uri, serving=True)
    for name, experiment_id in experiment_links(resolved):
        click.echo(f"  {name}: {runs_link(experiment_id, port)}")
    click.echo(f"MLflow UI on http://127.0.0.1:{port} over {redact(resolved.tracking_uri)}")
    serve_mlflow(resolved.tracking_uri, resolved.artifact_root, "127.0.0.1", port)


@click.command()
@store_option
@click.option("--backend-store-uri", default=None,
              help="Runs and registry database: postgresql+psycopg://USER@HOST:PORT/DB or sqlite:///PATH "
                   "[default the store's mlflow.db].")
@click.option("--artifacts-destination", default=None,
              help="Where the server keeps artifacts (a folder, s3://...) [default the store's artifacts/].")
@click.option("--storage", default=None, help="The Optuna storage workers share (printed for them; "
                                              "PostgreSQL for several machines).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on; anything but 127.0.0.1 makes the server reachable from other machines.")
@click.option("--port", default=5000, show_default=True)
@click.option("--allowed-host", "more_allowed_hosts", multiple=True, metavar="HOST",
              help="Another name workers reach the server by (a DNS alias, a proxy's HOST:PORT, a pattern like "
                   "*.lab.example; repeatable). Localhost, private addresses and this machine's hostname, "
                   "full domain name and IP addresses are allowed already.")
@click.option("--auth", "force_auth", is_flag=True,
              help="Ask for a user and password on the loopback interface too (always asked on any other).")
@click.option("--no-auth", "no_auth", count=True,
              help="Serve without authentication: anyone who reaches the port may read, delete and re-alias "
                   "everything. Refused on a public interface unless given twice.")
@click.option("--admin-password-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help=f"A file holding the admin's password [default ${ADMIN_PASSWORD_ENV}]; read when the users "
                   f"database is created (never an option value: it would stay in the shell's history).")
@click.option("--default-permission", type=click.Choice(PERMISSIONS), default="READ", show_default=True,
              help="What a user may do with others' experiments and models unless granted more.")
def server(store, backend_store_uri, artifacts_destination, storage, host, port, more_allowed_hosts, force_auth,
           no_auth, admin_password_file, default_permission):
    """Start an MLflow tracking server for workers on many machines, and print the URIs
    they need (Ctrl-C or SIGTERM stops it). Off the loopback interface it asks every request
    for a user and password (MLflow's basic-auth app: users, and permissions per experiment and
    registered model)."""
    from bnet.tracking.secrets import redact
    from bnet.tracking.store import connect

    resolved = resolve(store, backend_store_uri, storage, serving=True)
    auth = authentication(host, port, force_auth, no_auth, admin_password_file, default_permission, resolved.root)
    connect(resolved)  # creates (or migrates) the backend schema once, before any worker races for it
    artifacts = Path(artifacts_destination) if artifacts_destination else resolved.artifact_root
    address = host if host not in ("0.0.0.0", "::") else _hostname()
    click.echo(f"MLflow tracking server on http://{address}:{port} (runs in {redact(resolved.tracking_uri)}, "
               f"artifacts in {artifacts})")
    click.echo("workers join with:")
    click.echo(f"  --tracking-uri http://{address}:{port} --storage {redact(resolved.optuna_storage)}")
    if redact(resolved.optuna_storage) != resolved.optuna_storage:
        click.echo("  (the storage's password shown as ***: give workers the URL as you gave it here, or without the "
                   "password and a password file: ?passfile=FILE or PGPASSFILE)")
    if auth:
        click.echo("  and a user of this server in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or in "
                   "~/.mlflow/credentials); the admin adds users and grants permissions with MLflow's auth "
                   f"client (README, Security). Users and permissions: {auth.database}")
    if resolved.optuna_storage.startswith("sqlite"):
        click.echo("  (a SQLite Optuna storage serves one process; give workers on several machines a "
                   "PostgreSQL --storage)")
    extra = []
    if host != "127.0.0.1" or more_allowed_hosts:
        # mlflow's --allowed-hosts replaces its defaults (localhost and the private ranges),
        # and workers on a cluster name the server by IP or full domain name: keep both
        names = machine_names()
        from_env = os.environ.get("MLFLOW_SERVER_ALLOWED_HOSTS", "")  # our option would silently override it
        extra = ["--allowed-hosts", ",".join(allowed_hosts(port, names, [*more_allowed_hosts, from_env]))]
        shown = [name for name in [*names, *more_allowed_hosts] if name not in ("localhost", "::1")
                 and not name.startswith("127.")]
        click.echo(f"it answers workers that name it localhost, a private address or {', '.join(shown)} "
                   f"(more with --allowed-host NAME)")
    if auth:
        extra += ["--app-name", "basic-auth"]
    serve_mlflow(resolved.tracking_uri, artifacts, host, port, extra, auth.environment if auth else {})


@dataclass
class Authentication:
    """MLflow's basic-auth app as ``bnet server`` runs it: its config file and users
    database in the store, and what the server process needs in its environment."""

    config: Path
    database: str
    environment: dict[str, str]


def authentication(host: str, port: int, force: bool, no_auth: int, password_file: str | None,
                   default_permission: str, root: Path) -> Authentication | None:
    """Whether (and how) the server authenticates: always off the loopback interface, unless
    ``--no-auth`` is given twice there; the admin's password from a file or the environment."""
    from bnet.errors import ConfigError
    from bnet.tracking.secrets import write_private

    public = host not in LOOPBACK
    if no_auth:
        if force:
            raise ConfigError("--auth and --no-auth contradict each other")
        if public and no_auth < 2:
            raise ConfigError(f"--no-auth on {host} would let anyone who reaches port {port} read every experiment, "
                              f"delete runs and move a registered model's aliases; give --no-auth twice if only "
                              f"trusted machines can reach it, or drop it and set an admin password")
        click.echo(f"warning: no authentication: anyone who reaches {host}:{port} may read, change and delete "
                   f"every run, experiment and registered model", err=True)
        return None
    if not (public or force):
        return None
    database = root / "basic_auth.db"
    password = None
    if password_file:
        password = Path(password_file).read_text().rstrip("\r\n")
    elif os.environ.get(ADMIN_PASSWORD_ENV):
        password = os.environ[ADMIN_PASSWORD_ENV]
    if not password and not database.exists():
        raise ConfigError(f"the server asks every request for a user and password: set the admin's with "
                          f"--admin-password-file FILE or ${ADMIN_PASSWORD_ENV} (user 'admin'; read once, when "
                          f"{database} is created)")
    root.mkdir(parents=True, exist_ok=True)
    if not database.exists():
        write_private(database, "")  # password hashes: the users database is its owner's alone
    config = write_private(root / "basic_auth.ini", "\n".join([
        "[mlflow]", f"default_permission = {default_permission}", f"database_uri = sqlite:///{database}",
        "admin_username = admin", "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
        "grant_default_workspace_access = false", ""]))
    environment = {"MLFLOW_AUTH_CONFIG_PATH": str(config),
                   "MLFLOW_FLASK_SERVER_SECRET_KEY": os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY")
                   or secrets.token_hex(32)}
    if password:
        environment[ADMIN_PASSWORD_ENV] = password
    return Authentication(config, str(database), environment)


def _hostname() -> str:
    import socket

    return socket.gethostname()


def machine_names() -> list[str]:
    """This machine's hostname, full domain name and IP addresses: the names a worker on
    another machine may put in its requests' Host header."""
    import socket

    names = [socket.gethostname(), socket.getfqdn()]
    for name in dict.fromkeys(names):
        try:
            names += [info[4][0] for info in socket.getaddrinfo(name, None)]
        except OSError:  # a hostname its own machine cannot resolve
            pass
    # the hostname often resolves to 127.0.1.1 alone while workers use the cluster network's address
    names += _interface_addresses()
    # link-local IPv6 addresses (fe80::1%eth0) need a zone no Host header carries
    return list(dict.fromkeys(name for name in names if name and "%" not in name))


def _interface_addresses() -> list[str]:
    """The IP addresses of this machine's network interfaces, as Linux lists them (none elsewhere)."""
    import ipaddress
    import socket
    import struct

    addresses = []
    try:
        import fcntl

        for _, interface in socket.if_nameindex():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                try:
                    request = struct.pack("256s", interface.encode()[:15])
                    answer = fcntl.ioctl(probe.fileno(), 0x8915, request)  # SIOCGIFADDR
                except OSError:  # an interface without an IPv4 address
                    continue
                addresses.append(socket.inet_ntoa(answer[20:24]))
    except (ImportError, OSError):
        pass
    try:
        with open("/proc/net/if_inet6") as table:
            for line in table:
                hex_address, _, _, scope = line.split()[:4]
                if int(scope, 16) != 0x20:  # not link-local
                    addresses.append(str(ipaddress.IPv6Address(bytes.fromhex(hex_address))))
    except (OSError, ValueError):
        pass
    return addresses


def allowed_hosts(port: int, names, extra=()) -> list[str]:
    """The Host headers the server answers: mlflow's defaults (localhost and private addresses,
    any port), ``names`` with and without ``:port``, and ``extra`` (comma-separated allowed)."""
    import ipaddress

    from mlflow.server.security_utils import get_default_allowed_hosts

    def bracketed(host: str) -> str:  # a Host header writes an IPv6 address in brackets
        try:
            return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
        except ValueError:
            return host

    hosts = list(get_default_allowed_hosts())
    for name in names:
        hosts += [bracketed(name), f"{bracketed(name)}:{port}"]
    for item in extra:
        for host in filter(None, (part.strip() for part in item.split(","))):
            host = bracketed(host)
            has_port = host.rpartition(":")[2].isdigit() and not host.endswith("]") or host.endswith(":*")
            hosts += [host] if has_port or host == "*" else [host, f"{host}:{port}"]
    return list(dict.fromkeys(hosts))


def serve_mlflow(backend_uri: str, artifacts, host: str, port: int, extra: list[str] = (),
                 environment: dict[str, str] | None = None) -> None:
    """Run ``mlflow server`` until it ends or bnet is stopped (then end it and its workers).
    The backend URL reaches it in the environment, not on a command line any user can list."""
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true",
               MLFLOW_BACKEND_STORE_URI=backend_uri, **(environment or {}))
    command = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1", *extra]
    if artifacts is not None:
        command += ["--artifacts-destination", str(artifacts)]
    # mlflow server starts uvicorn (and a job runner) as children of its own: in a process
    # group of their own they can all be ended together, whatever signal ends bnet
    process = subprocess.Popen(command, env=env, start_new_session=True)

    def stop(signum=None, frame=None):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        end_process_group(process)


def end_process_group(process: subprocess.Popen, timeout: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader may be gone while its workers linger
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return


@click.command()
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--port", type=int, default=55432, show_default=True)
def postgres(folder, port):
    """Run a PostgreSQL server in FOLDER on 127.0.0.1 for many workers on one machine (Debian's
    postgresql package); prints the URLs to pass. Every connection needs the password it
    generates, kept in FOLDER/pgpass (only you can read it); the URLs name that file, never
    the password. Ctrl-C stops it."""
    import time

    from bnet.tracking.local_postgres import LocalPostgres

    server = LocalPostgres(folder, port).start()
    try:
        optuna_url, mlflow_url = server.create_database("optuna"), server.create_database("mlflow")
        click.echo(f"PostgreSQL on 127.0.0.1:{port}, data in {server.root}/data, password (scram-sha-256) in "
                   f"{server.passfile}; workers pass:")
        click.echo(f"  --storage {optuna_url} --tracking-uri {mlflow_url}")
        click.echo(f"  (or these URLs without ?passfile=... and PGPASSFILE={server.passfile} in their environment)")
        stopped = []
        signal.signal(signal.SIGTERM, lambda signum, frame: stopped.append(signum))
        while not stopped:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        click.echo("PostgreSQL stopped")
