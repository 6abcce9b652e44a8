"""Shared servers (issue 26): `bnet postgres` asks every connection for a password it keeps in a
user-only file, `bnet server` off the loopback interface (or with --auth) refuses strangers, and
a password in a storage or tracking URL reaches no output, script, Optuna storage or MLflow
database."""

import base64
import http.client
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bnet.tracking.local_postgres import free_port, postgres_binaries, wait_for_port
from bnet.tracking.secrets import holds_password, redact, store_password
from conftest import assert_clean_failure, invoke, run_cli

SECRET = "Pa55-w0rd-n0body-may-see"
STUDY_YAML = """
experiment: {experiment}
model: {{model_type: linear, n_ae_latents: [2, 3]}}
training: {{learning_rate: 0.003, max_n_epochs: 2}}
tuning: {{n_trials: {n_trials}, pruner: none, study: {experiment}}}
"""


def test_a_password_file_is_its_owners_alone_and_escaped_as_libpq_reads_it(tmp_path):
    passfile = store_password(tmp_path / "pgpass", "db.example", 6543, "bob", "p:w")
    assert passfile.read_text() == "db.example:6543:*:bob:p\\:w\n"
    assert stat.S_IMODE(passfile.stat().st_mode) == 0o600
    store_password(passfile, "db.example", 6543, "bob", "new")
    assert passfile.read_text() == "db.example:6543:*:bob:new\n"  # replaced, not appended


def test_redaction_hides_every_form_of_url_password():
    text = ("--storage postgresql+psycopg://bob:s3c:r@t@db.example:5432/optuna "
            "--tracking-uri https://alice:pw@mlflow.example/ and postgresql://db.example/x?sslmode=require&password=pw2")
    shown = redact(text)
    assert "s3c" not in shown and ":pw@" not in shown and "pw2" not in shown
    assert "bob:***@db.example:5432/optuna" in shown and "alice:***@mlflow.example" in shown
    assert "sslmode=require&password=***" in shown
    assert redact("sqlite:////tmp/store/optuna.db") == "sqlite:////tmp/store/optuna.db"
    assert holds_password("postgresql://bob:pw@h/db") and not holds_password("postgresql://bob@h/db")


@pytest.mark.postgres
def test_postgres_asks_every_connection_for_the_password_in_its_file(postgres, monkeypatch, tmp_path):
    import psycopg

    monkeypatch.delenv("PGPASSFILE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.pgpass to fall back on
    for host in ("127.0.0.1", str(postgres.root)):  # TCP, and the cluster's own socket
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(host=host, port=postgres.port, user="postgres", dbname="postgres", connect_timeout=10)
    assert stat.S_IMODE(postgres.passfile.stat().st_mode) == 0o600
    password = postgres.passfile.read_text().splitlines()[0].rsplit(":", 1)[1]
    url = postgres.create_database("asked")
    assert password not in url and "passfile=" in url
    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as connection:
        assert connection.execute("SELECT current_user").fetchone() == ("postgres",)
    # the generated password is not one a neighbour can guess
    assert len(password) >= 24


@pytest.mark.postgres
def test_bnet_postgres_prints_urls_without_the_password():
    if postgres_binaries() is None:
        pytest.skip("no PostgreSQL server installed")
    root = tempfile.mkdtemp(prefix="bnet-pg-cli-")  # where the postgres user may enter
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "bnet", "postgres", root, "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while process.poll() is None and time.time() < deadline and not wait_for_port(port, 1):
            pass
        assert process.poll() is None, process.communicate()[0]
        time.sleep(3)  # the URLs are printed once the databases exist
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
    try:
        password = (Path(root) / "pgpass").read_text().splitlines()[0].rsplit(":", 1)[1]
        assert "scram-sha-256" in output and "passfile=" in output and "PGPASSFILE=" in output, output
        assert password not in output
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _database_text(url: str) -> str:
    """Every row of every table of a database, as text (what a grep of a dump would see)."""
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as connection:
        tables = [row[0] for row in connection.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")]
        return "\n".join(f"{table}: {connection.execute(f'SELECT * FROM {table}').fetchall()!r}" for table in tables)


@pytest.mark.slow
@pytest.mark.postgres
def test_a_url_password_reaches_no_output_script_storage_or_run(postgres, tiny_session, tmp_path):
    import psycopg

    with psycopg.connect(postgres.database_url("postgres").replace("postgresql+psycopg", "postgresql"),
                         autocommit=True) as connection:
        connection.execute(f"CREATE ROLE alice LOGIN PASSWORD '{SECRET}'")
        for name in ("sec_optuna", "sec_mlflow"):
            connection.execute(f"CREATE DATABASE {name} OWNER alice")
    storage = f"postgresql+psycopg://alice:{SECRET}@127.0.0.1:{postgres.port}/sec_optuna"
    tracking = f"postgresql+psycopg://alice:{SECRET}@127.0.0.1:{postgres.port}/sec_mlflow"
    config = tmp_path / "study.yaml"
    config.write_text(STUDY_YAML.format(experiment="secret-study", n_trials=2))
    env = {k: v for k, v in os.environ.items() if k not in ("PGPASSFILE", "BNET_OPTUNA_STORAGE", "BNET_TRACKING_URI")}
    store = tmp_path / "store"
    urls = ["--storage", storage, "--tracking-uri", tracking, "--store", str(store)]
    outputs = {}
    for name, words in {
        "tune --n-workers 2": ["tune", "ae", "--data", str(tiny_session), "--config", str(config), "--n-workers", "2",
                               *urls],
        "worker": ["worker", "--study", "secret-study", "--n-trials", "3", *urls],
        "best": ["best", "ae", "--experiment", "secret-study", "--tracking-uri", tracking],
    }.items():
        result = subprocess.run([sys.executable, "-m", "bnet", *words], capture_output=True, text=True, env=env,
                                timeout=600)
        outputs[name] = result.stdout + result.stderr
        assert result.returncode == 0, outputs[name]
    script = tmp_path / "job.sbatch"
    outputs["slurm"] = invoke("slurm", "tune", "ae", "--data", tiny_session, "--config", config, "--storage", storage,
                              "--tracking-uri", tracking, "--array", "2", "--script", script, "--dry-run")
    for name, output in outputs.items():
        assert SECRET not in output, f"{name} printed the password:\n{output}"
    assert "alice:***@" in outputs["tune --n-workers 2"]  # the summary says where, redacted
    assert SECRET not in script.read_text()
    for url in (storage, tracking):
        dumped = _database_text(url)
        assert "secret-study" in dumped and SECRET not in dumped
    stored = [path for path in store.rglob("*") if path.is_file() and SECRET.encode() in path.read_bytes()]
    assert not stored, stored


def _request(port: int, method: str, path: str, body: dict | None = None, user: tuple[str, str] | None = None) -> int:
    headers = {"Content-Type": "application/json"}
    if user:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=json.dumps(body or {}), headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.mark.slow
def test_an_authenticating_server_refuses_strangers_and_serves_a_worker(tmp_path, tiny_session, monkeypatch):
    from mlflow.server import get_app_client
    from mlflow.tracking import MlflowClient

    port = free_port()
    (tmp_path / "admin").write_text("admin-password-xyz\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    server = subprocess.Popen([sys.executable, "-m", "bnet", "server", "--store", str(tmp_path / "served"), "--auth",
                               "--port", str(port), "--admin-password-file", str(tmp_path / "admin")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while server.poll() is None and time.time() < deadline and not wait_for_port(port, 1):
            pass
        assert server.poll() is None, server.communicate()[0]
        # no credentials: 401, for reading and for writing
        assert _request(port, "POST", "/api/2.0/mlflow/experiments/create", {"name": "x"}) == 401
        assert _request(port, "GET", "/api/2.0/mlflow/experiments/search?max_results=1") == 401
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "admin-password-xyz")
        get_app_client("basic-auth", tracking_uri=uri).create_user("alice", "alice-password-123")
        admins = MlflowClient(uri).create_experiment("admins-only")
        # a user without permission on an experiment: 403 for writing into it
        alice = ("alice", "alice-password-123")
        assert _request(port, "POST", "/api/2.0/mlflow/runs/create", {"experiment_id": admins}, alice) == 403
        assert _request(port, "POST", "/api/2.0/mlflow/runs/create", {"experiment_id": admins},
                        ("alice", "wrong")) == 401
        # a worker with credentials runs a real study through the server
        config = tmp_path / "study.yaml"
        config.write_text(STUDY_YAML.format(experiment="alices-study", n_trials=2))
        worker_env = dict(env, MLFLOW_TRACKING_USERNAME="alice", MLFLOW_TRACKING_PASSWORD="alice-password-123")
        done = subprocess.run([sys.executable, "-m", "bnet", "tune", "ae", "--data", str(tiny_session), "--config",
                               str(config), "--tracking-uri", uri, "--store", str(tmp_path / "worker")],
                              capture_output=True, text=True, env=worker_env, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "alice-password-123" not in done.stdout + done.stderr
        experiment = MlflowClient(uri).get_experiment_by_name("alices-study")
        runs = MlflowClient(uri).search_runs([experiment.experiment_id], "tags.`bnet.role` = 'trial'")
        assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
        # a worker without: a clear error, no traceback
        refused = subprocess.run([sys.executable, "-m", "bnet", "tune", "ae", "--data", str(tiny_session), "--config",
                                  str(config), "--tracking-uri", uri, "--store", str(tmp_path / "stranger")],
                                 capture_output=True, text=True, env=env, timeout=300)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
        assert "MLFLOW_TRACKING_USERNAME" in refused.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=60)[0]
    assert "admin-password-xyz" not in output and "MLFLOW_TRACKING_USERNAME" in output


def test_a_server_off_loopback_needs_an_admin_password_or_no_auth_twice(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    store = tmp_path / "store"
    assert_clean_failure(run_cli("server", "--store", store, "--host", "0.0.0.0"), "--admin-password-file",
                         "MLFLOW_AUTH_ADMIN_PASSWORD")
    assert_clean_failure(run_cli("server", "--store", store, "--host", "0.0.0.0", "--no-auth"),
                         "give --no-auth twice")
    assert_clean_failure(run_cli("server", "--store", store, "--auth", "--no-auth"), "contradict")
