"""`bnet worker`, `--n-workers`, `bnet slurm`: many workers on one study (no database server
needed here; tests/test_postgres.py runs the same against a real PostgreSQL)."""

import optuna
import pytest

import bnet
from bnet.tracking import resolve_store
from conftest import invoke

pytestmark = pytest.mark.slow

STUDY = """
experiment: joined
model: {model_class: neural-labels, n_lags: 0, n_hid_layers: 0}
training: {learning_rate: {low: 1.0e-3, high: 3.0e-2, log: true}, max_n_epochs: 3}
tuning: {n_trials: 2, pruner: none, seed: 0}
"""
PG = "postgresql+psycopg://bnet@db.example:5432/optuna"


def test_a_worker_joins_a_study_from_what_it_recorded(tmp_path, tiny_session):
    config = tmp_path / "s.yaml"
    config.write_text(STUDY)
    store = tmp_path / "store"
    invoke("tune", "decoder", "--data", tiny_session, "--target", "labels", "--config", config, "--store", store)
    output = invoke("worker", "--study", "joined", "--store", store, "--n-trials", 4)
    assert "resumes with 2 finished trials; 2 trials to go" in output
    study = optuna.load_study(study_name="joined", storage=resolve_store(store).optuna_storage)
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 4
    runs = bnet.best_runs("joined", "decoder", 4, store=resolve_store(store))
    assert {r.params["max_n_epochs"] for r in runs} == {"3"} and {r.params["n_lags"] for r in runs} == {"0"}
    assert "no study 'nothing'" in invoke("worker", "--study", "nothing", "--store", store, code=1)


def test_several_workers_need_a_database_server(tmp_path, tiny_session):
    output = invoke("tune", "decoder", "--data", tiny_session, "--target", "labels", "--experiment", "x",
                    "--n-workers", 2, "--store", tmp_path / "store", code=1)
    assert "embedded SQLite file, which serves one process" in output and "PostgreSQL --storage" in output
    assert not (tmp_path / "store" / "optuna.db").exists()


def test_slurm_script_starts_array_tasks_as_workers(tmp_path, tiny_session):
    script = tmp_path / "job.sbatch"
    output = invoke("slurm", "tune", "ae", "--data", tiny_session, "--experiment", "big", "--storage", PG,
                    "--tracking-uri", "http://mlflow.example:5000", "--array", 8,
                    "--sbatch-opts", "--gres=gpu:1 --time=12:00:00", "--script", script)
    text = script.read_text()
    assert f"wrote {script}" in output
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash" and "#SBATCH --array=0-7" in lines
    assert "#SBATCH --gres=gpu:1" in lines and "#SBATCH --time=12:00:00" in lines
    command = lines[-1]
    assert command.startswith("exec ") and "-m bnet tune ae --data" in command
    assert f"--storage {PG}" in command and "--array" not in command
    printed = invoke("slurm", "tune", "ae", "--data", tiny_session, "--storage", PG, "--array", 2, "--dry-run")
    assert "#SBATCH --array=0-1" in printed


@pytest.mark.parametrize("args, message", [
    (["tune", "ae", "--data", "x.hdf5", "--array", 4], "embedded SQLite file"),
    (["tune", "ae", "--bogus", "1", "--storage", PG, "--array", 2], "No such option '--bogus'"),
    (["data", "synth", "x.hdf5", "--array", 2], "bnet slurm runs 'tune <family> ...' or 'worker ...'"),
    (["tune", "ae", "--storage", PG, "--array", 2, "--submit"], "sbatch is not on this machine"),
])
def test_slurm_refuses_what_cannot_run_on_a_cluster(args, message):
    assert message in invoke("slurm", *args, code=1)
