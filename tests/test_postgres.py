"""Several workers share one study through PostgreSQL (Optuna storage and MLflow backend).

The server comes from Debian's package (.ci/run installs it), started by the fixture in a
temporary folder; the test is skipped with the reason where no PostgreSQL is installed.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient

from bnet.tracking.local_postgres import LocalPostgres, free_port, postgres_binaries, wait_for_port

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

STUDY_YAML = """
experiment: shared
model: {model_type: linear, n_ae_latents: [2, 3], l2_reg: {low: 1.0e-6, high: 1.0e-3, log: true}}
training: {learning_rate: 0.003, max_n_epochs: 2}
tuning: {n_trials: 6, pruner: none}
"""


class PostgreSQL:
    """The server: its databases' URLs, and able to restart itself and create databases."""

    def __init__(self, server):
        self.restart, self.create, self.database = server.restart, server.create_database, server.database_url
        self._server = server

    def outage(self, seconds: float) -> None:
        """The server stopped for ``seconds`` (a restart that takes a while)."""
        self._server.stop()
        time.sleep(seconds)
        self._server.start()


@pytest.fixture(scope="module")
def postgres():
    if postgres_binaries() is None:
        pytest.skip("no PostgreSQL server installed (apt-get install postgresql; .ci/run does)")
    # directly under /tmp: the postgres user cannot enter pytest's root-only folders
    root = tempfile.mkdtemp(prefix="bnet-pg-")
    server = LocalPostgres(root).start()
    try:
        for database in ("optuna", "mlflow"):
            server.create_database(database)
        yield PostgreSQL(server)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_one_study(postgres, tmp_path, tiny_session):
    config = tmp_path / "study.yaml"
    config.write_text(STUDY_YAML)
    storage, tracking = postgres.database("optuna"), postgres.database("mlflow")
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
    # a trial asked for at the moment the other worker started the last needed one is surplus:
    # told FAIL, never fitted, no run (the race shows more often as checkpoints take longer)
    fitted = [t for t in study.trials if not t.user_attrs.get("bnet_surplus")]
    assert {r.info.run_id for r in runs} == {t.user_attrs["mlflow_run_id"] for t in fitted}
    parents = client.search_runs([experiment.experiment_id], "tags.`bnet.role` = 'study'")
    assert len({r.data.tags["mlflow.parentRunId"] for r in runs}) == 1
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} <= {p.info.run_id for p in parents}
    assert all(any(line.startswith("trial ") for line in out.splitlines()) for out in outputs)


# -------------------------------------------------- many workers, many machines, and faults

MANY_YAML = """
experiment: {name}
model: {{model_class: neural-labels, n_lags: 0, n_hid_layers: 0}}
training: {{learning_rate: {{low: 1.0e-3, high: 3.0e-2, log: true}}, max_n_epochs: {epochs}, min_n_epochs: {epochs}}}
tuning: {{n_trials: {n}, pruner: none, seed: 0}}
"""


def tune_command(tmp_path, session, postgres, name, n, epochs, workers):
    config = tmp_path / f"{name}.yaml"
    config.write_text(MANY_YAML.format(name=name, n=n, epochs=epochs))
    # Optuna and MLflow each keep their schema version in a table of the same name: two databases
    database = (postgres.create(name.replace("-", "_") + "_optuna"), postgres.create(name.replace("-", "_") + "_mlflow"))
    return [sys.executable, "-m", "bnet", "tune", "decoder", "--data", str(session), "--target", "labels",
            "--config", str(config), "--storage", database[0], "--tracking-uri", database[1],
            "--store", str(tmp_path / "store"), "--n-workers", str(workers)], database


def finished_and_runs(database, name):
    study = optuna.load_study(study_name=name, storage=database[0])
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    client = MlflowClient(database[1])
    experiment = client.get_experiment_by_name(name)
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id], "tags.`bnet.role` = 'trial'")}
    return study, finished, runs, client, experiment


def test_two_machines_of_two_workers_finish_exactly_the_requested_trials(postgres, tmp_path, tiny_session):
    """Two process groups (machines) x two workers each on one study."""
    command, database = tune_command(tmp_path, tiny_session, postgres, "four-workers", n=10, epochs=4, workers=2)
    groups = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True) for _ in range(2)]
    outputs = [g.communicate(timeout=600)[0] for g in groups]
    assert [g.returncode for g in groups] == [0, 0], "\n=====\n".join(outputs)
    assert all("2 workers finished" in out and "[worker 1] trial" in out for out in outputs)
    study, finished, runs, client, experiment = finished_and_runs(database, "four-workers")
    assert len(finished) == 10
    assert len({t.number for t in study.trials}) == len(study.trials)
    fitted = [t for t in study.trials if not t.user_attrs.get("bnet_surplus")]
    # every fitted trial has exactly one run, every run belongs to one trial
    assert sorted(t.user_attrs["mlflow_run_id"] for t in fitted) == sorted(runs)
    assert all(runs[t.user_attrs["mlflow_run_id"]].info.status == "FINISHED" for t in finished)
    assert len(client.search_runs([experiment.experiment_id], "tags.`bnet.role` = 'study'")) == 1


def _wait_for_running_trial(database, name, seconds=300):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            study = optuna.load_study(study_name=name, storage=database[0])
        except KeyError:
            time.sleep(0.5)
            continue
        for trial in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
            if trial.intermediate_values and "mlflow_run_id" in trial.user_attrs:
                return trial
        time.sleep(0.3)
    raise AssertionError("no trial got going")


def test_a_sigkilled_worker_leaves_no_finished_trial_lost(postgres, tmp_path, tiny_session):
    command, database = tune_command(tmp_path, tiny_session, postgres, "killed", n=4, epochs=300, workers=2)
    group = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    victim = _wait_for_running_trial(database, "killed")
    os.kill(int(victim.user_attrs["bnet_worker"].split("/")[1]), signal.SIGKILL)
    output = group.communicate(timeout=600)[0]
    assert group.returncode == 1 and "workers exited with" in output, output
    assert "its worker is gone; trial FAIL, run KILLED; queued again" in output
    study, finished, runs, client, _ = finished_and_runs(database, "killed")
    assert len(finished) == 4
    killed = study.trials[victim.number]
    assert killed.state.name == "FAIL"
    assert runs[killed.user_attrs["mlflow_run_id"]].info.status == "KILLED"
    retry = [t for t in study.trials if t.user_attrs.get("bnet_retry_of_trial") == victim.number]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE" and retry[0].params == killed.params
    assert runs[retry[0].user_attrs["mlflow_run_id"]].data.tags.get("bnet.retry_of_run") == killed.user_attrs["mlflow_run_id"], output
    assert all(runs[t.user_attrs["mlflow_run_id"]].info.status == "FINISHED" for t in finished)


def test_every_worker_survives_a_postgresql_restart(postgres, tmp_path, tiny_session):
    command, database = tune_command(tmp_path, tiny_session, postgres, "restart", n=6, epochs=150, workers=2)
    group = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    _wait_for_running_trial(database, "restart")
    time.sleep(1)
    postgres.restart()
    output = group.communicate(timeout=600)[0]
    assert group.returncode == 0, output
    study, finished, runs, _, _ = finished_and_runs(database, "restart")
    assert len(finished) == 6
    assert all(runs[t.user_attrs["mlflow_run_id"]].info.status == "FINISHED" for t in finished)


def test_mlflow_server_with_a_postgresql_backend_serves_workers_over_http(postgres, tmp_path, tiny_session):
    port = free_port()
    backend = postgres.create("served")
    server = subprocess.Popen([sys.executable, "-m", "bnet", "server", "--backend-store-uri", backend,
                               "--store", str(tmp_path / "server"), "--port", str(port),
                               "--storage", postgres.database("optuna")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        assert wait_for_port(port)
        uri = f"http://127.0.0.1:{port}"
        config = tmp_path / "http.yaml"
        config.write_text(MANY_YAML.format(name="over-http", n=2, epochs=3))
        result = subprocess.run([sys.executable, "-m", "bnet", "tune", "decoder", "--data", str(tiny_session),
                                 "--target", "labels", "--config", str(config), "--tracking-uri", uri,
                                 "--store", str(tmp_path / "client")], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("over-http")
        runs = client.search_runs([experiment.experiment_id], "tags.`bnet.role` = 'trial'")
        assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
        assert "checkpoint" in {a.path for a in client.list_artifacts(runs[0].info.run_id)}
        assert not (tmp_path / "client" / "artifacts").exists()  # the server kept them
    finally:
        server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=60)[0]
    assert f"--tracking-uri http://127.0.0.1:{port} --storage {postgres.database('optuna')}" in output


OUTAGE_YAML = """
experiment: outage
model: {n_ae_latents: [2, 3]}
training: {max_n_epochs: [3, 12], min_n_epochs: 12, learning_rate: 1.0e-3, batch_size: 16}
tuning: {n_trials: 3, pruner: none, sampler: grid, seed: 0}
"""


def test_a_trial_longer_than_the_heartbeat_survives_a_database_outage(postgres, tmp_path):
    """Optuna's heartbeat thread died on its first write to the stopped database; the other
    worker then failed the trial still being fitted, and its own worker crashed on telling
    it ("Cannot tell a FAIL trial"). Epochs here last longer than the shortened heartbeat,
    and the outage longer than its grace period."""
    import dataclasses

    from bnet.data import synthesize
    from conftest import TINY

    session = synthesize(tmp_path / "outage.hdf5", dataclasses.replace(TINY, n_trials=30, y_pixels=32, x_pixels=32))
    config = tmp_path / "outage.yaml"
    config.write_text(OUTAGE_YAML)
    database = (postgres.create("outage_optuna"), postgres.create("outage_mlflow"))
    command = [sys.executable, "-m", "bnet", "tune", "ae", "--data", str(session), "--config", str(config),
               "--storage", database[0], "--tracking-uri", database[1], "--store", str(tmp_path / "store"),
               "--n-workers", "2"]
    group = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True, env={**os.environ, "BNET_HEARTBEAT_SECONDS": "1"})
    _wait_for_running_trial(database, "outage")
    postgres.outage(seconds=5)  # grace period: 3 heartbeats of 1 s
    output = group.communicate(timeout=600)[0]
    assert group.returncode == 0, output
    assert "Traceback" not in output and "marked FAIL by another worker" not in output, output
    study, finished, runs, client, experiment = finished_and_runs(database, "outage")
    assert len(finished) == 3 and not [t for t in study.trials if t.state.name == "FAIL"], output
    assert all(runs[t.user_attrs["mlflow_run_id"]].info.status == "FINISHED" for t in finished)
    parents = client.search_runs([experiment.experiment_id], "tags.`bnet.role` = 'study'")
    assert [p.info.status for p in parents] == ["FINISHED"]
