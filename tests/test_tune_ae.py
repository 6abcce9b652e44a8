"""`bnet tune ae` end to end on a real SQLite MLflow store and Optuna storage."""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import mlflow
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

import bnet
from bnet.data import TrialBatches, open_session, split_trials
from bnet.tracking import resolve_store
from bnet.training import evaluate
from conftest import invoke

pytestmark = pytest.mark.slow

STUDY_YAML = """
experiment: ae-test
model:
  model_type: conv
  n_ae_latents: [2, 3]
  l2_reg: {low: 1.0e-6, high: 1.0e-3, log: true}
training:
  learning_rate: {low: 3.0e-4, high: 3.0e-3, log: true}
  max_n_epochs: 3
  early_stop_history: 5
tuning: {n_trials: 3, sampler: tpe, pruner: none, seed: 1}
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_session):
    root = tmp_path_factory.mktemp("study")
    config = root / "study.yaml"
    config.write_text(STUDY_YAML)
    store = root / "store"
    output = invoke("tune", "ae", "--data", tiny_session, "--config", config, "--store", store)
    return {"store": store, "config": config, "output": output, "data": tiny_session}


def client_for(store):
    resolved = resolve_store(store)
    return MlflowClient(resolved.tracking_uri), resolved


def test_study_has_one_parent_and_a_child_run_per_trial(study):
    client, _ = client_for(study["store"])
    experiment = client.get_experiment_by_name("ae-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("bnet.role") == "study"]
    children = [r for r in runs if r.data.tags.get("bnet.role") == "trial"]
    assert len(parents) == 1 and len(children) == 3
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    assert sorted(int(r.data.tags["bnet.trial"]) for r in children) == [0, 1, 2]
    for run in children:
        tags = run.data.tags
        assert tags["bnet.model_class"] == "ae" and tags["bnet.model_type"] == "conv"
        assert tags["bnet.study"] == "ae-test" and tags["bnet.family"] == "ae"
        assert tags["bnet.dataset"] == "synthetic/bnet-synth/seed3/tiny"
        assert len(tags["bnet.data_hash"]) == 16
        params = run.data.params
        assert params["n_ae_latents"] in ("2", "3") and float(params["l2_reg"]) > 0
        # every hyperparameter is a param, defaults included
        assert params["trial_splits"] == "8;1;1;0" and params["rng_seed_data"] == "0"
        assert params["max_n_epochs"] == "3" and params["y_pixels"] == "16" and params["rng_seed_model"] == "0"
        assert {"best_val_loss", "test_loss", "best_epoch", "train_loss", "val_loss"} <= set(run.data.metrics)
        assert run.info.status == "FINISHED"


def test_trial_and_run_point_at_each_other(study):
    client, resolved = client_for(study["store"])
    optuna_study = optuna.load_study(study_name="ae-test", storage=resolved.optuna_storage)
    for trial in optuna_study.trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert int(run.data.tags["bnet.trial"]) == trial.number
        assert float(run.data.params["learning_rate"]) == pytest.approx(trial.params["learning_rate"])
        assert run.data.metrics["best_val_loss"] == pytest.approx(trial.value)


def test_per_epoch_metrics_have_steps_and_dataset_input(study):
    client, _ = client_for(study["store"])
    run_id = json.loads(invoke("best", "ae", "--experiment", "ae-test", "--json", "--store", study["store"]))[0]["run_id"]
    history = client.get_metric_history(run_id, "val_loss")
    assert [m.step for m in history] == [0, 1, 2]
    assert min(m.value for m in history) == pytest.approx(client.get_run(run_id).data.metrics["best_val_loss"])
    inputs = client.get_run(run_id).inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.digest == client.get_run(run_id).data.tags["bnet.data_hash"]


def test_artifacts_checkpoint_latents_and_figures(study, tmp_path):
    client, resolved = client_for(study["store"])
    run_id = bnet.best_runs("ae-test", family="ae", store=resolved)[0].run_id
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"checkpoint", "exports", "plots"} <= names
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert plots == {"plots/training_curves.png", "plots/reconstructions.png"}
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="exports/latents.hdf5",
                                                dst_path=str(tmp_path), tracking_uri=resolved.tracking_uri)
    session = open_session(study["data"])
    with h5py.File(local) as f:
        assert len(f["latents"]) == session.n_trials
        n_latents = int(client.get_run(run_id).data.params["n_ae_latents"])
        assert f["latents/trial_0000"].shape == (20, n_latents)
        splits = split_trials(session.trials, "8;1;1;0", 0)
        assert list(f["splits/test"][()]) == list(splits.test)


def test_best_names_lowest_best_val_loss_among_finished_runs(study):
    client, _ = client_for(study["store"])
    experiment = client.get_experiment_by_name("ae-test")
    finished = [r for r in client.search_runs([experiment.experiment_id], "tags.`bnet.role` = 'trial'")
                if r.info.status == "FINISHED"]
    lowest = min(finished, key=lambda r: r.data.metrics["best_val_loss"])
    ranked = json.loads(invoke("best", "ae", "--experiment", "ae-test", "--top", 3, "--json", "--store", study["store"]))
    assert ranked[0]["run_id"] == lowest.info.run_id
    values = [r["metrics"]["best_val_loss"] for r in ranked]
    assert values == sorted(values) and len(values) == 3
    assert {"run_id", "params", "metrics", "artifact_uri"} <= set(ranked[0])
    text = invoke("best", "ae", "--experiment", "ae-test", "--store", study["store"])
    assert lowest.info.run_id in text


def test_registered_model_loaded_by_alias_reproduces_val_loss(study):
    output = invoke("register", "ae", "--experiment", "ae-test", "--name", "ae-test-model",
                    "--alias", "champion", "--store", study["store"])
    assert "version 1" in output
    resolved = resolve_store(study["store"])
    model = bnet.load_model("models:/ae-test-model@champion", store=resolved)
    run = model.run
    assert run.run_id == bnet.best_runs("ae-test", family="ae", store=resolved)[0].run_id
    session = open_session(study["data"])
    splits = split_trials(session.trials, "8;1;1;0", 0)
    val_loss = evaluate(model, TrialBatches(session, splits.val), torch.device("cpu"))
    assert val_loss == pytest.approx(run.metrics["best_val_loss"], rel=1e-4)
    # the same model by run id
    by_id = bnet.load_model(run.run_id, store=resolved)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), by_id.state_dict().values()))


def test_rerunning_tops_up_the_same_study(study):
    output = invoke("tune", "ae", "--data", study["data"], "--config", study["config"], "--n-trials", 4,
                    "--store", study["store"])
    assert "resumes with 3 finished trials; 1 trial to go" in output
    client, resolved = client_for(study["store"])
    optuna_study = optuna.load_study(study_name="ae-test", storage=resolved.optuna_storage)
    assert len([t for t in optuna_study.trials if t.state.name == "COMPLETE"]) == 4
    experiment = client.get_experiment_by_name("ae-test")
    parents = client.search_runs([experiment.experiment_id], "tags.`bnet.role` = 'study'")
    assert len(parents) == 1
    again = invoke("tune", "ae", "--data", study["data"], "--config", study["config"], "--n-trials", 4,
                   "--store", study["store"])
    assert "0 trials to go" in again


def test_killed_study_resumes_without_losing_finished_trials(tmp_path, tiny_session):
    config = tmp_path / "study.yaml"
    config.write_text(STUDY_YAML)
    store = tmp_path / "store"
    command = [sys.executable, "-m", "bnet", "tune", "ae", "--data", str(tiny_session), "--config", str(config),
               "--store", str(store), "--n-trials", "3"]
    worker = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seen = []
    deadline = time.time() + 300
    for line in worker.stdout:
        seen.append(line)
        if line.startswith("trial 1 (run") or time.time() > deadline:  # killed as trial 1 starts
            break
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert any("trial 0 done" in line for line in seen), "".join(seen)
    resolved = resolve_store(store)
    first = optuna.load_study(study_name="ae-test", storage=resolved.optuna_storage)
    finished_before = {t.number: t.value for t in first.trials if t.state.name == "COMPLETE"}
    assert list(finished_before) == [0]

    output = invoke("tune", "ae", "--data", tiny_session, "--config", config, "--store", store,
                    "--n-trials", 3)
    assert "resumes with 1 finished trials; 2 trials to go" in output
    after = optuna.load_study(study_name="ae-test", storage=resolved.optuna_storage)
    complete = {t.number: t.value for t in after.trials if t.state.name == "COMPLETE"}
    assert len(complete) == 3 and complete[0] == finished_before[0]
    client = MlflowClient(resolved.tracking_uri)
    run = client.get_run(after.trials[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["best_val_loss"] == pytest.approx(finished_before[0])
