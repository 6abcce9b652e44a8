"""`bnet tune pipeline`: nested stage runs with lineage, comparable downstream scores, bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import bnet
from bnet.errors import TrackingError
from bnet.models import build_model
from bnet.models.arhmm.registered import SegmentationConfig
from bnet.tracking import resolve_store
from bnet.tracking.lineage import lineage
from bnet.models.decoders import DecoderConfig
from bnet.tuning.families.pipeline import (
    Whitening, arhmm_in_latent_coordinates, decoder_in_latent_coordinates,
)
from bnet.models.decoder_metrics import r2_score
from conftest import assert_clean_failure, invoke, run_cli

PIPELINE_YAML = """
experiment: pipe
model: {model_type: linear, n_ae_latents: [2, 3]}
training: {learning_rate: 0.003, max_n_epochs: 3, min_n_epochs: 1}
downstream: {n_arhmm_states: 2, n_arhmm_lags: 1, arhmm_n_iters: 4, decoder_n_lags: 1, decoder_max_n_epochs: 4}
tuning: {n_trials: 2, seed: 0}
"""


@pytest.fixture(scope="module")
def pipeline_study(tmp_path_factory, tiny_session):
    root = tmp_path_factory.mktemp("pipeline")
    (root / "pipe.yaml").write_text(PIPELINE_YAML)
    store = root / "store"
    output = invoke("tune", "pipeline", "--data", tiny_session, "--config", root / "pipe.yaml", "--store", store)
    return {"root": root, "store": resolve_store(store), "output": output, "data": tiny_session}


def _runs(store, **wanted):
    client = MlflowClient(store.tracking_uri)
    experiment = client.get_experiment_by_name("pipe")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return [r for r in runs if all(r.data.tags.get(k) == v for k, v in wanted.items())]


@pytest.mark.slow
def test_every_stage_is_a_run_nested_under_its_trial_with_lineage(pipeline_study, tmp_path):
    store = pipeline_study["store"]
    (parent,) = _runs(store, **{"bnet.role": "study"})
    trials = _runs(store, **{"bnet.role": "trial", "bnet.family": "pipeline"})
    assert len(trials) == 2
    for trial in trials:
        assert trial.data.tags["mlflow.parentRunId"] == parent.info.run_id
        stages = {r.data.tags["bnet.stage"]: r for r in _runs(store, **{"mlflow.parentRunId": trial.info.run_id})}
        assert set(stages) == {"ae", "arhmm", "decoder"}  # the tiny session has neural activity
        ae, arhmm, decoder = stages["ae"], stages["arhmm"], stages["decoder"]
        for stage, family in (("ae", "ae"), ("arhmm", "arhmm"), ("decoder", "decoder")):
            run = stages[stage]
            assert run.info.status == "FINISHED"
            assert run.data.tags["bnet.role"] == "stage" and run.data.tags["bnet.family"] == family
            assert run.data.tags["bnet.pipeline_run_id"] == trial.info.run_id
            assert run.data.tags["bnet.data_hash"] == trial.data.tags["bnet.data_hash"]
        # lineage: each downstream stage read this trial's AE, and says so
        assert arhmm.data.tags["bnet.upstream.ae_run_id"] == ae.info.run_id
        assert decoder.data.tags["bnet.upstream.ae_run_id"] == ae.info.run_id
        walked = [step.run.run_id for step in lineage(arhmm.info.run_id, store)]
        assert walked == [arhmm.info.run_id, ae.info.run_id]
        # the trial reports the stages' own figures (reconstruction as the AE logged it)
        assert trial.data.metrics["ae_best_val_loss"] == pytest.approx(ae.data.metrics["best_val_loss"])
        assert trial.data.metrics["arhmm_val_ll_gain_per_step"] == pytest.approx(
            arhmm.data.metrics["val_ll_gain_per_step"])
        assert trial.data.metrics["decoder_val_r2"] == pytest.approx(decoder.data.metrics["val_r2"])
        # each stage keeps its family's model and exports: the AE's latents are what the others read
        paths = {a.path for a in MlflowClient(store.tracking_uri).list_artifacts(ae.info.run_id, "exports")}
        assert "exports/latents.hdf5" in paths
    # the answer is the Pareto front, on the parent run
    path = MlflowClient(store.tracking_uri).download_artifacts(parent.info.run_id, "pareto_front.json", str(tmp_path))
    front = json.loads(Path(path).read_text())
    assert front and all({"ae_best_val_loss", "arhmm_val_ll_per_step", "decoder_val_r2"} <= set(p) for p in front)
    assert "Pareto front" in pipeline_study["output"]


@pytest.mark.slow
def test_stage_runs_register_and_feed_studies_like_their_familys_trials(pipeline_study, tmp_path):
    store = pipeline_study["store"]
    # stage runs are no family's study trials: `best` of the AE family finds none of them
    with pytest.raises(TrackingError, match="no finished ae runs"):
        bnet.best_runs("pipe", family="ae", store=store)
    ae = _runs(store, **{"bnet.stage": "ae"})[0]
    invoke("register", "ae", "--experiment", "pipe", "--name", "pipe-ae", "--run", ae.info.run_id,
           "--store", pipeline_study["store"].root)
    model = bnet.load_model("models:/pipe-ae@champion", store=store)
    assert model.config.n_ae_latents == int(ae.data.params["n_ae_latents"])
    config = tmp_path / "arhmm.yaml"
    config.write_text("experiment: arhmm-after\nmodel: {n_arhmm_states: 2}\ntraining: {n_iters: 2}\n"
                      "tuning: {n_trials: 1}\n")
    invoke("tune", "arhmm", "--data", pipeline_study["data"], "--ae", "models:/pipe-ae@champion", "--config", config,
           "--store", pipeline_study["store"].root)
    (run,) = bnet.best_runs("arhmm-after", family="arhmm", store=store)
    assert run.tags["bnet.upstream.ae_run_id"] == ae.info.run_id


def _regime_walk(rng, T=400, D=3):
    x = np.zeros((T, D))
    for t in range(1, T):  # an AR(1) walk switching between two dynamics
        x[t] = (0.9 if (t // 50) % 2 else -0.5) * x[t - 1] + rng.normal(size=D)
    return x


def test_whitened_scores_do_not_depend_on_the_latents_scale_or_rotation():
    rng = np.random.default_rng(0)
    x = _regime_walk(rng)
    prediction = x + rng.normal(size=x.shape) * x.std(0)
    mixing = rng.normal(size=(3, 3)) * 5  # another AE's latents: the same information, mixed and moved
    arhmm_scores, decoder_scores = [], []
    for transform in (lambda v: v, lambda v: v @ mixing + 3.0):
        latents = transform(x)
        whitening = Whitening.fit([latents[:300]], "test")
        decoder_scores.append(r2_score(whitening(latents[300:]), whitening(transform(prediction[300:])))[0])
        model = build_model(SegmentationConfig(n_arhmm_states=2, n_arhmm_lags=1, n_iters=20, dtype="float64"))
        model.engine.fit([whitening(latents[:300])])
        arhmm_scores.append(model.engine.log_likelihood([whitening(latents[300:])]) / (100 * 3))
    # the two whitenings differ by a rotation, which neither the fit nor the score sees
    assert arhmm_scores[0] == pytest.approx(arhmm_scores[1], abs=1e-6)
    assert decoder_scores[0] == pytest.approx(decoder_scores[1], abs=1e-9)
    assert 0 < decoder_scores[0] < 1
    # white noise scores -log(2 pi e) / 2 per whitened dimension whatever the latent count
    for n_dims in (2, 12):
        noise = rng.normal(size=(4000, n_dims)) * rng.uniform(0.1, 10, size=n_dims)
        z = Whitening.fit([noise], "test")(noise)
        per_dim = -0.5 * (z**2).mean() - 0.5 * np.log(2 * np.pi)
        assert per_dim == pytest.approx(-0.5 * np.log(2 * np.pi * np.e), abs=1e-3)


@pytest.mark.parametrize("lags", [1, 2])
def test_an_arhmm_of_whitened_latents_is_saved_as_the_same_model_of_the_latents(lags):
    rng = np.random.default_rng(1)
    x = _regime_walk(rng) @ rng.normal(size=(3, 3)) * 4 + 2.0
    whitening = Whitening.fit([x[:300]], "test")
    model = build_model(SegmentationConfig(n_arhmm_states=2, n_arhmm_lags=lags, n_iters=10, dtype="float64"))
    model.engine.fit([whitening(x[:300])])
    moved = arhmm_in_latent_coordinates(model, whitening)
    whitened_posterior = model.engine.expected_states([whitening(x[300:])]).expected_states[0]
    posterior = moved.engine.expected_states([x[300:]]).expected_states[0]
    np.testing.assert_allclose(posterior.numpy(), whitened_posterior.numpy(), atol=1e-8)
    # the saved parameters are those of the latents, not of their whitened coordinates
    assert not np.allclose(moved.state_dict()["As"].numpy(), model.state_dict()["As"].numpy())


def test_whitening_refuses_latents_of_lower_rank():
    x = np.random.default_rng(0).normal(size=(100, 3))
    x[:, 2] = x[:, 0]
    with pytest.raises(bnet.errors.DataError, match="span 2 of 3 dimensions"):
        Whitening.fit([x], "AE run abc")


def test_searched_or_impossible_downstream_stages_are_refused(tmp_path, tiny_session):
    config = tmp_path / "pipe.yaml"
    config.write_text(PIPELINE_YAML.replace("n_arhmm_states: 2", "n_arhmm_states: [2, 3]"))
    store = tmp_path / "store"
    assert_clean_failure(run_cli("tune", "pipeline", "--data", tiny_session, "--config", config, "--store", store),
                         "downstream n_arhmm_states is searched", store=store)
    config.write_text(PIPELINE_YAML.replace("decoder_n_lags: 1", "decoder_n_lags: 15"))
    assert_clean_failure(run_cli("tune", "pipeline", "--data", tiny_session, "--config", config, "--store", store),
                         "decoder_n_lags=15", str(tiny_session), store=store)
    config.write_text(PIPELINE_YAML)
    assert_clean_failure(run_cli("tune", "pipeline", "--data", tiny_session, "--config", config, "--stages",
                                 "hmm", "--store", store), "downstream stages 'hmm'", store=store)


@pytest.mark.parametrize("hidden", [0, 1])
def test_a_decoder_of_whitened_latents_is_saved_as_the_same_decoder_of_the_latents(hidden):
    rng = np.random.default_rng(2)
    latents = rng.normal(size=(200, 3)) @ rng.normal(size=(3, 3)) * 3 + 1.0
    whitening = Whitening.fit([latents], "test")
    model = build_model(DecoderConfig(model_class="neural-ae", n_input=5, n_output=3, n_lags=1, n_max_lags=1,
                                      n_hid_layers=hidden, n_hid_units=8))
    inputs = torch.from_numpy(rng.normal(size=(50, 5)).astype(np.float32))
    moved = decoder_in_latent_coordinates(model, whitening)
    expected = model.predict(inputs).double().numpy() @ np.linalg.inv(whitening.matrix) + whitening.mean
    np.testing.assert_allclose(moved.predict(inputs).double().numpy(), expected, rtol=1e-4, atol=1e-4)


def test_the_downstream_section_accepts_exactly_the_downstream_settings():
    from bnet.config import SECTION_KEYS
    from bnet.tuning.families.pipeline import DOWNSTREAM_KEYS

    # config.py lists the section's keys without importing torch; the dataclass is the truth
    assert SECTION_KEYS["downstream"] == set(DOWNSTREAM_KEYS)
