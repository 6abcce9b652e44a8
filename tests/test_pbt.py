"""`--scheduler pbt`: a population trained by Ray Tune's PBT, its members MLflow runs whose
exploits really go on from the donor's checkpoint."""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bnet.tracking import resolve_store
from conftest import assert_clean_failure, invoke, run_cli

pytest.importorskip("ray.tune")

PBT_YAML = """
experiment: pbt
model: {model_type: linear, n_ae_latents: 3}
training:
  learning_rate: {low: 1.0e-4, high: 1.0e-1, log: true}
  max_n_epochs: 6
tuning: {population: 3, perturbation_interval: 2, seed: 0}
"""


@pytest.fixture(scope="module")
def population(tmp_path_factory, tiny_session):
    root = tmp_path_factory.mktemp("pbt")
    (root / "pbt.yaml").write_text(PBT_YAML)
    output = invoke("tune", "ae", "--data", tiny_session, "--config", root / "pbt.yaml", "--scheduler", "pbt",
                    "--store", root / "store")
    store = resolve_store(root / "store")
    client = MlflowClient(store.tracking_uri)
    experiment = client.get_experiment_by_name("pbt")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("bnet.role") == "study"]
    members = {int(r.data.tags["bnet.trial"]): r for r in runs if r.data.tags.get("bnet.role") == "trial"}
    history = json.loads(Path(client.download_artifacts(parent.info.run_id, "pbt_history.json", str(root))).read_text())
    return {"client": client, "parent": parent, "members": members, "history": history, "output": output}


def _series(client, run, key):
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}


@pytest.mark.slow
def test_every_member_is_a_run_with_its_hyperparameters_over_the_epochs(population):
    client, parent, members = population["client"], population["parent"], population["members"]
    assert sorted(members) == [0, 1, 2]
    assert parent.data.tags["bnet.scheduler"] == "pbt"
    for member in members.values():
        assert member.info.status == "FINISHED"
        assert member.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert member.data.tags["bnet.family"] == "ae" and member.data.tags["bnet.scheduler"] == "pbt"
        assert sorted(_series(client, member, "hp.learning_rate")) == list(range(6))
        assert "best_val_loss" in member.data.metrics and "learning_rate" in member.data.params
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/pbt_hyperparameters.png" in artifacts
    assert "3 complete" in population["output"]


@pytest.mark.slow
def test_an_exploit_goes_on_from_the_donors_checkpoint_and_explores(population):
    client, members, history = population["client"], population["members"], population["history"]
    assert history, "the population never exploited"
    for event in history:
        member, donor = members[event["member"]], members[event["donor_member"]]
        assert event["donor_run_id"] == donor.info.run_id != member.info.run_id
        # the weights the member loaded are bit for bit the checkpoint the donor saved at that epoch
        assert event["loaded_digest"] == _series(client, donor, "checkpoint_digest")[event["epoch"]]
        assert _series(client, member, "pbt_loaded_digest")[event["epoch"]] == event["loaded_digest"]
        assert _series(client, member, "pbt_exploited_from")[event["epoch"]] == event["donor_member"]
        # and its next epoch trains with the donor's learning rate, perturbed (or drawn anew)
        rate = _series(client, member, "hp.learning_rate")[event["epoch"] + 1]
        assert rate == pytest.approx(event["hparams"]["learning_rate"])
        ratio = rate / event["donor_hparams"]["learning_rate"]
        assert ratio == pytest.approx(0.8) or ratio == pytest.approx(1.2) or 1e-4 <= rate <= 1e-1


def test_pbt_is_refused_where_it_cannot_run(tmp_path, tiny_session):
    config = tmp_path / "pbt.yaml"
    store = tmp_path / "store"
    config.write_text(PBT_YAML.replace("learning_rate: {low: 1.0e-4, high: 1.0e-1, log: true}",
                                       "learning_rate: 1.0e-3"))
    assert_clean_failure(run_cli("tune", "ae", "--data", tiny_session, "--config", config, "--scheduler", "pbt",
                                 "--store", store), "perturbs searched continuous hyperparameters", store=store)
    config.write_text(PBT_YAML.replace("max_n_epochs: 6", "max_n_epochs: 2"))
    assert_clean_failure(run_cli("tune", "ae", "--data", tiny_session, "--config", config, "--scheduler", "pbt",
                                 "--store", store), "perturbation_interval", store=store)
    assert_clean_failure(run_cli("tune", "arhmm", "--data", tiny_session, "--labels", "--scheduler", "pbt",
                                 "--experiment", "x", "--store", store), "--scheduler pbt trains families", store=store)
