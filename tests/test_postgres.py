"""Several workers share one study through PostgreSQL (Optuna storage and MLflow backend).

The server comes from Debian's package (.ci/run installs it), started by the fixture in a
temporary folder; the test is skipped with the reason where no PostgreSQL is installed.
"""

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import optuna
import pytest
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

STUDY_YAML = """
experiment: shared
model: {model_type: linear, n_ae_latents: [2, 3], l2_reg: {low: 1.0e-6, high: 1.0e-3, log: true}}
training: {learning_rate: 0.003, max_n_epochs: 2}
tuning: {n_trials: 6, pruner: none}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not binaries:
        pytest.skip("no PostgreSQL server installed (apt-get install postgresql; .ci/run does)")
    bin_dir = os.path.dirname(binaries[-1])
    # directly under /tmp: the postgres user cannot enter pytest's root-only folders
    root = tempfile.mkdtemp(prefix="bnet-pg-")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(root, "postgres")
    port = free_port()
    subprocess.run(as_postgres + [f"{bin_dir}/initdb", "-D", f"{root}/data", "-U", "postgres",
                                  "--auth-local=trust", "--auth-host=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run(as_postgres + [f"{bin_dir}/pg_ctl", "-D", f"{root}/data", "-l", f"{root}/log", "-w", "-o",
                                  f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root}",
                                  "start"], check=True, capture_output=True)
    try:
        for database in ("optuna", "mlflow"):
            subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c",
                            f"CREATE DATABASE {database}"], check=True, capture_output=True)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(as_postgres + [f"{bin_dir}/pg_ctl", "-D", f"{root}/data", "-m", "fast", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_one_study(postgres, tmp_path, tiny_session):
    config = tmp_path / "study.yaml"
    config.write_text(STUDY_YAML)
    storage, tracking = f"{postgres}/optuna", f"{postgres}/mlflow"
    command = [sys.executable, "-m", "bnet", "tune", "ae", "--data", str(tiny_session), "--config", str(config),
               "--storage", storage, "--tracking-uri", tracking, "--store", str(tmp_path / "store")]
    workers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n=====\n".join(outputs)
    study = optuna.load_study(study_name="shared", storage=storage)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert 6 <= len(complete) <= 7  # each worker stops once the study holds 6; one may be mid-trial
    assert len({t.number for t in study.trials}) == len(study.trials)
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("shared")
    runs = client.search_runs([experiment.experiment_id], "tags.`bnet.role` = 'trial'")
    assert {r.info.run_id for r in runs} == {t.user_attrs["mlflow_run_id"] for t in study.trials}
    parents = client.search_runs([experiment.experiment_id], "tags.`bnet.role` = 'study'")
    assert len({r.data.tags["mlflow.parentRunId"] for r in runs}) == 1
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} <= {p.info.run_id for p in parents}
    assert all(any(line.startswith("trial ") for line in out.splitlines()) for out in outputs)
