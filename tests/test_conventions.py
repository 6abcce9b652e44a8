"""Conventions users meet first: exit codes, and the environment every MLflow user sets."""

import os

from conftest import assert_clean_failure, run_cli


def test_mlflow_tracking_uri_is_honoured_and_a_data_error_exits_1(tmp_path, monkeypatch):
    for name in ("BNET_TRACKING_URI", "BNET_STORE", "BNET_OPTUNA_STORAGE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    result = run_cli("best", "ae", "--experiment", "none-yet", "--store", tmp_path / "store")
    assert_clean_failure(result, "none-yet", code=1)
    assert (tmp_path / "elsewhere.db").exists() and not (tmp_path / "store" / "mlflow.db").exists()


def test_using_a_store_leaves_mlflows_process_wide_uri_alone(tmp_path, monkeypatch):
    """MLflow's set_tracking_uri exports MLFLOW_TRACKING_URI: bnet calling it would send every
    later store of the process (another notebook cell, the next test) to the first one."""
    from bnet.tracking.store import connect, resolve_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    connect(resolve_store(tmp_path / "one"))
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert resolve_store(tmp_path / "two").tracking_uri == f"sqlite:///{tmp_path / 'two' / 'mlflow.db'}"


def test_a_usage_error_exits_2_and_help_names_the_variables():
    assert_clean_failure(run_cli("best", "ae"), "Missing option '--experiment'", code=2)
    shown = " ".join(run_cli("best", "ae", "--help").output.split())
    assert "BNET_TRACKING_URI, MLFLOW_TRACKING_URI" in shown and "BNET_STORE" in shown


def test_the_commands_that_serve_a_database_ignore_a_tracking_server_in_the_environment(tmp_path, monkeypatch):
    """`bnet ui` and `bnet server` serve the store's database; MLFLOW_TRACKING_URI naming a
    server (as on the machine that runs it) is where workers log, not a backend."""
    from bnet.tracking.store import resolve_store

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert resolve_store(tmp_path / "s").tracking_uri == "http://mlflow.example:5000"
    assert resolve_store(tmp_path / "s", serving=True).tracking_uri == f"sqlite:///{tmp_path / 's' / 'mlflow.db'}"
