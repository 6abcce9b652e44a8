"""`bnet tune bayesian-decoder` over tracked AE, ARHMM and decoder runs of one session."""

import h5py
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from bnet.data import SynthConfig, synthesize
from bnet.tracking import resolve_store
from bnet.tracking.registry import load_model
from conftest import assert_clean_failure, invoke, run_cli

# a weak neural signal (Gaussian noise twice the readout's spread): where the prior should help
SESSION = SynthConfig(n_trials=30, n_frames=40, y_pixels=32, x_pixels=32, n_neurons=20, n_states=3, seed=5,
                      neural_noise="gaussian", neural_noise_std=2.0)
CONFIGS = {
    "ae": "experiment: ae\nmodel: {model_type: conv, n_ae_latents: 4}\n"
          "training: {learning_rate: 0.001, max_n_epochs: 8, batch_size: null}\ntuning: {n_trials: 1}\n",
    "arhmm": "experiment: seg\nmodel: {n_arhmm_states: 3, n_arhmm_lags: 1}\ntraining: {n_iters: 20}\n"
             "tuning: {n_trials: 1}\n",
    "latent": "experiment: dec-ae\nmodel: {n_lags: 2, n_hid_layers: 0}\n"
              "training: {learning_rate: 0.01, max_n_epochs: 60}\ntuning: {n_trials: 1}\n",
    "state": "experiment: dec-states\nmodel: {n_lags: 2, n_hid_layers: 0}\n"
             "training: {learning_rate: 0.01, max_n_epochs: 60}\ntuning: {n_trials: 1}\n",
    "bayes": "experiment: bayes\nmodel: {prior_scale: {low: 1.0, high: 1.0e6, log: true}, n_posterior_samples: 4}\n"
             "tuning: {n_trials: 3, seed: 0}\n",
}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("bayes")
    store = root / "store"
    data = synthesize(root / "weak.hdf5", SESSION)
    for name, text in CONFIGS.items():
        (root / f"{name}.yaml").write_text(text)
    invoke("tune", "ae", "--data", data, "--config", root / "ae.yaml", "--store", store)
    invoke("tune", "arhmm", "--data", data, "--ae-experiment", "ae", "--config", root / "arhmm.yaml", "--store", store)
    invoke("tune", "decoder", "--data", data, "--target", "ae", "--ae-experiment", "ae", "--config",
           root / "latent.yaml", "--store", store)
    invoke("tune", "decoder", "--data", data, "--target", "arhmm", "--arhmm-experiment", "seg", "--config",
           root / "state.yaml", "--store", store)
    output = invoke("tune", "bayesian-decoder", "--data", data, "--arhmm-experiment", "seg",
                    "--decoder-experiment", "dec-ae", "--state-decoder-experiment", "dec-states",
                    "--config", root / "bayes.yaml", "--store", store)
    return {"root": root, "store": store, "data": data, "output": output, "resolved": resolve_store(store)}


def _trials(study):
    client = MlflowClient(study["resolved"].tracking_uri)
    experiment = client.get_experiment_by_name("bayes")
    return client, client.search_runs([experiment.experiment_id], "tags.`bnet.role` = 'trial'")


@pytest.mark.slow
def test_a_study_combines_the_runs_and_scores_them_beside_the_direct_decoders(study):
    client, runs = _trials(study)
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    assert "the best model predicts held-out latents with R²" in study["output"]
    for run in runs:
        m, t = run.data.metrics, run.data.tags
        for split in ("val", "test"):
            for name in ("latent_mse", "direct_latent_mse", "mean_latent_mse", "frame_mse", "direct_frame_mse",
                         "state_accuracy", "direct_state_accuracy", "common_state_accuracy", "coverage_90"):
                assert np.isfinite(m[f"{split}_{name}"]), (split, name)
        # c is searched between 1 and 1e6: the smaller the scale, the more of the decoder is clamped
        assert m["clamped_fraction"] < 0.5 or float(run.data.params["prior_scale"]) < 10
        for upstream in ("arhmm", "decoder", "state_decoder"):
            assert t[f"bnet.upstream.{upstream}_run_id"]
        assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} >= {"plots/posterior_latents.png", "plots/posterior_states.png"}
    best = min(runs, key=lambda r: r.data.metrics["val_latent_mse"])
    # the weak signal: the prior helps the held-out latents and the states
    assert best.data.metrics["test_latent_mse"] < best.data.metrics["test_direct_latent_mse"]
    assert best.data.metrics["test_frame_mse"] < best.data.metrics["test_direct_frame_mse"]
    assert best.data.metrics["test_state_accuracy"] > best.data.metrics["test_common_state_accuracy"]


@pytest.mark.slow
def test_the_posterior_is_exported_and_the_model_reloads(study, tmp_path):
    _, runs = _trials(study)
    run = runs[0]
    path = MlflowClient(study["resolved"].tracking_uri).download_artifacts(run.info.run_id, "exports/posterior.hdf5",
                                                                          str(tmp_path))
    with h5py.File(path) as f:
        trial = sorted(f["means"])[0]
        assert f["means"][trial].shape == (40, 4) and f["samples"][trial].shape == (4, 40, 4)
        assert f["probs"][trial].shape == (40, 3) and f["viterbi"][trial].shape == (40,)
        means = f["means"][trial][()]
    model = load_model(run.info.run_id, study["resolved"])
    with h5py.File(study["data"]) as f:
        neural = torch.from_numpy(f[f"neural/{trial}"][()])
    # a trial's draws are its own (seeded by its index), whatever is decoded with it
    again = model.posterior([neural], keys=[int(trial.removeprefix("trial_"))])[0]
    np.testing.assert_allclose(again.mean.numpy(), means, rtol=1e-5, atol=1e-6)
    invoke("best", "bayesian-decoder", "--experiment", "bayes", "--store", study["store"])
    invoke("register", "bayesian-decoder", "--experiment", "bayes", "--name", "bayes", "--store", study["store"])
    assert load_model("models:/bayes@champion", study["resolved"]).config.model_class == "bayesian-decoder"
    output = invoke("plot", "bayesian-decoder", "models:/bayes@champion", "--trials", 1, "--out", tmp_path / "b.gif",
                    "--store", study["store"])
    assert "posterior mean | posterior draw 1 | posterior draw 2 | states: ARHMM / decoder / Bayesian" in output and (tmp_path / "b.gif").stat().st_size


@pytest.mark.slow
def test_runs_that_do_not_fit_together_are_refused(study):
    result = run_cli("tune", "bayesian-decoder", "--data", study["data"], "--arhmm-experiment", "seg",
                     "--decoder-experiment", "dec-states", "--state-decoder-experiment", "dec-states",
                     "--experiment", "bad", "--store", study["store"])
    assert_clean_failure(result, "--decoder resolves to decoder run", "decodes arhmm, not AE latents")
    result = run_cli("tune", "bayesian-decoder", "--data", study["data"], "--arhmm-experiment", "seg",
                     "--decoder-experiment", "dec-ae", "--experiment", "bad", "--store", study["store"])
    assert_clean_failure(result, "--state-decoder best needs --state-decoder-experiment")


@pytest.mark.slow
def test_the_gibbs_method_is_a_study_too(study):
    invoke("tune", "bayesian-decoder", "--data", study["data"], "--arhmm-experiment", "seg", "--decoder-experiment",
           "dec-ae", "--state-decoder-experiment", "dec-states", "--method", "gibbs", "--experiment", "bayes-gibbs",
           "--n-trials", 1, "--config", study["root"] / "bayes.yaml", "--store", study["store"])
    client = MlflowClient(study["resolved"].tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("bayes-gibbs").experiment_id],
                                "tags.`bnet.role` = 'trial'")
    assert run.data.params["method"] == "gibbs" and run.data.tags["bnet.model_type"] == "gibbs"
    assert run.data.metrics["test_latent_mse"] < run.data.metrics["test_direct_latent_mse"]
