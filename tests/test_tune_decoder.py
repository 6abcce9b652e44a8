"""`bnet tune decoder`, `bnet ensemble` and `bnet lineage` on real stores."""

import numpy as np
import pytest

import bnet
from bnet.data import open_session
from bnet.data.m1 import build_m1_session, lag_window
from bnet.tracking import resolve_store
from conftest import SHARED, assert_clean_failure, frames, invoke, run_cli, write_session

pytestmark = pytest.mark.slow

M1 = SHARED / "data" / "spykesml_m1_s1" / "m1_stevenson_2011.mat"

M1_YAML = """
experiment: m1
model:
  model_class: neural-labels
  n_lags: 3
  n_hid_layers: 1
  n_hid_units: [64, 128]
  activation: relu
  l2_reg: {low: 1.0e-4, high: 1.0e-2, log: true}
training:
  learning_rate: {low: 5.0e-4, high: 2.0e-3, log: true}
  max_n_epochs: 25
  early_stop_history: 4
tuning: {n_trials: 3, pruner: none, seed: 0}
"""


def ridge_on_split(session, splits, lags=3, alpha=1.0):
    """The README's ridge floor (±3-bin window), fitted and scored on the decoder's own split."""
    def design(trials):
        x = np.concatenate([lag_window(session.read("neural", t), lags)[lags:-lags] for t in trials])
        y = np.concatenate([session.read("labels", t)[lags:-lags] for t in trials])
        return x, y
    x_train, y_train = design(splits.train)
    x_test, y_test = design(splits.test)
    mean_x, mean_y = x_train.mean(0), y_train.mean(0)
    a = x_train - mean_x
    weights = np.linalg.solve(a.T @ a + alpha * np.eye(a.shape[1]), a.T @ (y_train - mean_y))
    predicted = (x_test - mean_x) @ weights + mean_y
    return 1 - ((predicted - y_test) ** 2).sum() / ((y_test - y_test.mean(0)) ** 2).sum()


@pytest.fixture(scope="module")
def m1_study(tmp_path_factory):
    if not M1.exists():
        pytest.skip(f"{M1} is absent")
    root = tmp_path_factory.mktemp("m1")
    session_path = build_m1_session(M1, root / "m1.hdf5")
    (root / "m1.yaml").write_text(M1_YAML)
    store = root / "store"
    invoke("tune", "decoder", "--data", session_path, "--target", "labels", "--config", root / "m1.yaml",
           "--store", store)
    return {"root": root, "store": store, "data": session_path}


def test_tuned_decoder_beats_the_ridge_floor_on_m1(m1_study):
    resolved = resolve_store(m1_study["store"])
    best = bnet.best_runs("m1", family="decoder", metric="val_r2", direction="maximize", store=resolved)[0]
    session = open_session(m1_study["data"], require=("neural", "labels"))
    splits = bnet.split_trials(session.trials)
    floor = ridge_on_split(session, splits)
    assert best.metrics["test_r2"] > floor, (best.metrics["test_r2"], floor)
    assert best.tags["bnet.target"] == "labels" and best.tags["bnet.model_class"] == "neural-labels"
    assert {"test_r2_0", "test_r2_1", "val_r2"} <= set(best.metrics)


def test_ensemble_is_at_least_as_good_as_its_best_member(m1_study):
    output = invoke("ensemble", "--experiment", "m1", "--max-members", 3, "--name", "m1-ensemble",
                    "--store", m1_study["store"])
    assert "ensemble run" in output
    resolved = resolve_store(m1_study["store"])
    members = bnet.best_runs("m1", family="decoder", top=3, metric="val_r2", direction="maximize", store=resolved)
    ensemble = bnet.best_runs("m1", family="ensemble", metric="val_r2", direction="maximize", store=resolved) or []
    from mlflow.tracking import MlflowClient
    client = MlflowClient(resolved.tracking_uri)
    experiment = client.get_experiment_by_name("m1")
    run = client.search_runs([experiment.experiment_id], "tags.`bnet.family` = 'ensemble'")[0]
    assert not ensemble  # an ensemble run is not a trial: `best decoder` keeps ranking single models
    metrics = run.data.metrics
    assert metrics["val_r2"] >= members[0].metrics["val_r2"] - 1e-9
    assert metrics["best_single_val_r2"] == pytest.approx(members[0].metrics["val_r2"])
    # averaging means cannot do worse than its members do on average (squared error is convex):
    # a property of every split, unlike beating the best member on test
    chosen = members[: int(metrics["n_members"])]
    assert metrics["test_r2"] >= np.mean([m.metrics["test_r2"] for m in chosen]) - 1e-9, metrics
    assert len(client.get_metric_history(run.info.run_id, "curve_val_r2")) == 3
    # re-validation: recompute from the members' own checkpoints
    assert "verified" in invoke("ensemble", "verify", run.info.run_id, "--store", m1_study["store"])
    # the registered ensemble loads and predicts like one decoder
    model = bnet.load_model("models:/m1-ensemble@champion", store=resolved)
    session = open_session(m1_study["data"], require=("neural",))
    import torch
    prediction = model.predict(torch.from_numpy(session.read("neural", 0).astype(np.float32)))
    assert prediction.shape == (100, 2)


def test_ensemble_verify_catches_a_tampered_ensemble(m1_study, tmp_path):
    resolved = resolve_store(m1_study["store"])
    from mlflow.tracking import MlflowClient
    client = MlflowClient(resolved.tracking_uri)
    experiment = client.get_experiment_by_name("m1")
    run = client.search_runs([experiment.experiment_id], "tags.`bnet.family` = 'ensemble'")[0]
    members = run.data.tags["bnet.ensemble.members"].split(",")
    other = [r.run_id for r in bnet.best_runs("m1", family="decoder", top=4, metric="val_r2", direction="maximize",
                                             store=resolved) if r.run_id not in members]
    if not other:
        pytest.skip("every run is a member")
    client.set_tag(run.info.run_id, "bnet.ensemble.members", ",".join([other[0]] + members[1:]))
    result = run_cli("ensemble", "verify", run.info.run_id, "--store", str(m1_study["store"]))
    client.set_tag(run.info.run_id, "bnet.ensemble.members", ",".join(members))
    assert_clean_failure(result, "recomputed predictions differ from the logged ones")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_session):
    """AE -> ARHMM -> neural-arhmm decoder on the tiny synthetic session."""
    root = tmp_path_factory.mktemp("pipeline")
    store = root / "store"
    (root / "ae.yaml").write_text("experiment: ae\nmodel: {model_type: linear, n_ae_latents: 3}\n"
                                  "training: {learning_rate: 0.003, max_n_epochs: 3}\ntuning: {n_trials: 1}\n")
    (root / "arhmm.yaml").write_text("experiment: seg\nmodel: {n_arhmm_states: 3}\ntraining: {n_iters: 5}\n"
                                     "tuning: {n_trials: 1}\n")
    (root / "dec.yaml").write_text("experiment: dec\nmodel: {n_lags: [0, 1], n_hid_layers: 0}\n"
                                   "training: {learning_rate: 0.01, max_n_epochs: 20}\ntuning: {n_trials: 2, pruner: none}\n")
    invoke("tune", "ae", "--data", tiny_session, "--config", root / "ae.yaml", "--store", store)
    invoke("tune", "arhmm", "--data", tiny_session, "--ae-experiment", "ae", "--config", root / "arhmm.yaml",
           "--store", store)
    invoke("tune", "decoder", "--data", tiny_session, "--target", "arhmm", "--arhmm-experiment", "seg",
           "--config", root / "dec.yaml", "--store", store)
    return {"root": root, "store": store, "data": tiny_session}


def test_state_decoder_lineage_reaches_the_data(pipeline):
    resolved = resolve_store(pipeline["store"])
    best = bnet.best_runs("dec", family="decoder", metric="val_ll", direction="maximize", store=resolved)[0]
    ae = bnet.best_runs("ae", family="ae", store=resolved)[0]
    assert best.tags["bnet.upstream.arhmm_run_id"] and best.tags["bnet.upstream.ae_run_id"] == ae.run_id
    assert {"val_accuracy", "test_accuracy", "val_ll"} <= set(best.metrics)
    output = invoke("lineage", best.run_id, "--store", pipeline["store"])
    lines = output.splitlines()
    assert lines[0].startswith(f"decoder run {best.run_id}")
    assert any(f"ae run {ae.run_id}" in line for line in lines)
    assert any("arhmm run" in line for line in lines)
    assert "<- data:" in output and "tiny.hdf5" in output


def test_ensembles_of_ae_studies_are_refused(pipeline):
    result = run_cli("ensemble", "--experiment", "ae", "--store", str(pipeline["store"]))
    assert_clean_failure(result, "holds ae runs", "each AE has its own latent space")


def test_ensemble_over_different_targets_is_refused(pipeline):
    (pipeline["root"] / "labels.yaml").write_text(
        "experiment: dec\nmodel: {n_lags: 0, n_hid_layers: 0}\ntraining: {max_n_epochs: 2}\n"
        "tuning: {n_trials: 1, study: dec-labels}\n")
    invoke("tune", "decoder", "--data", pipeline["data"], "--target", "labels", "--config",
           pipeline["root"] / "labels.yaml", "--store", pipeline["store"])
    invoke("tune", "decoder", "--data", pipeline["data"], "--target", "ae", "--ae-experiment", "ae", "--config",
           pipeline["root"] / "labels.yaml", "--study", "dec-ae", "--store", pipeline["store"])
    result = run_cli("ensemble", "--experiment", "dec", "--metric", "val_r2",
                     "--store", str(pipeline["store"]))
    assert_clean_failure(result, "cannot be averaged")


@pytest.mark.parametrize("args, fragment", [
    (["--target", "ae", "--ae", "0123456789abcdef0123456789abcdef"], "no run with id"),
    (["--target", "ae", "--ae-experiment", "seg"], "experiment 'seg' has no finished ae runs"),
    (["--target", "arhmm", "--arhmm-experiment", "ae"], "experiment 'ae' has no finished arhmm runs"),
])
def test_bad_upstream_references(pipeline, args, fragment):
    result = run_cli("tune", "decoder", "--data", str(pipeline["data"]), *args,
                     "--experiment", "never", "--n-trials", "1", "--store", str(pipeline["store"]))
    assert_clean_failure(result, fragment)


@pytest.mark.parametrize("yaml_text, fragment", [
    ("data: {subsample_method: single, subsample_idxs_dataset: cortex}", "no region regions/indxs/cortex"),
    ("data: {subsample_method: single, subsample_idxs_group_0: areas}", "no region grouping regions/areas"),
    ("model: {n_lags: 15}", "n_lags=15 leaves no frames to score"),
    ("model: {activation: swish}", "activation 'swish'"),
])
def test_bad_decoder_configs(tmp_path, tiny_session, yaml_text, fragment):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    store = tmp_path / "store"
    result = run_cli("tune", "decoder", "--data", str(tiny_session), "--target", "labels",
                     "--experiment", "x", "--n-trials", "1", "--config", str(config),
                     "--store", str(store))
    assert_clean_failure(result, fragment, store=store)


def test_missing_neural_and_frame_mismatch(tmp_path):
    labels = {f"trial_{i:04d}": np.zeros((10, 2)) for i in range(10)}
    no_neural = write_session(tmp_path / "no_neural.hdf5", {"images": {k: frames(10) for k in labels}, "labels": labels})
    store = tmp_path / "store"
    result = run_cli("tune", "decoder", "--data", str(no_neural), "--target", "labels",
                     "--experiment", "x", "--n-trials", "1", "--store", str(store))
    assert_clean_failure(result, "no_neural.hdf5", "no group 'neural'", store=store)
    neural = {k: np.zeros((10, 3)) for k in labels}
    neural["trial_0003"] = np.zeros((9, 3))
    mismatch = write_session(tmp_path / "mismatch.hdf5", {"neural": neural, "labels": labels})
    result = run_cli("tune", "decoder", "--data", str(mismatch), "--target", "labels",
                     "--experiment", "x", "--n-trials", "1", "--store", str(store))
    assert_clean_failure(result, "mismatch.hdf5", "trial_0003", store=store)


def test_region_subsets_fit_one_study_per_region(tmp_path, tiny_session):
    config = tmp_path / "regions.yaml"
    config.write_text("model: {n_lags: 0, n_hid_layers: 0}\ntraining: {max_n_epochs: 2}\n"
                      "data: {subsample_method: single, subsample_idxs_dataset: all}\n")
    output = invoke("tune", "decoder", "--data", tiny_session, "--target", "labels", "--experiment", "regions",
                    "--n-trials", 1, "--config", config, "--store", tmp_path / "store")
    assert "study 'regions-region-0'" in output and "study 'regions-region-1'" in output
    runs = bnet.best_runs("regions", family="decoder", top=5, metric="val_r2", direction="maximize",
                          store=resolve_store(tmp_path / "store"))
    assert sorted(r.tags["bnet.neuron_subset"] for r in runs) == ["region-0", "region-1"]
    assert {r.params["n_input"] for r in runs} == {"5"}


def test_constant_targets_are_refused(tmp_path):
    neural = {f"trial_{i:04d}": np.random.default_rng(i).poisson(1.0, (20, 4)).astype(float) for i in range(10)}
    labels = {k: np.ones((20, 2)) for k in neural}
    path = write_session(tmp_path / "flat.hdf5", {"neural": neural, "labels": labels})
    store = tmp_path / "store"
    result = run_cli("tune", "decoder", "--data", str(path), "--target", "labels",
                     "--experiment", "x", "--n-trials", "1", "--store", str(store))
    assert_clean_failure(result, "flat.hdf5", "labels dimension 0 is constant", store=store)


def test_decoder_config_without_n_lags_scores_with_the_default_window(tmp_path, tiny_session):
    """A config that searches something but not n_lags: DecoderConfig's own n_lags sets the
    frames every metric drops."""
    config = tmp_path / "lr.yaml"
    config.write_text("training: {learning_rate: [1.0e-3, 1.0e-2]}\n")
    output = invoke("tune", "decoder", "--data", tiny_session, "--target", "labels", "--experiment", "plain",
                    "--config", config, "--n-trials", 1, "--max-epochs", 2, "--store", tmp_path / "store")
    assert "1 complete" in output
    run = bnet.best_runs("plain", family="decoder", store=resolve_store(tmp_path / "store"))[0]
    assert run.params["n_max_lags"] == run.params["n_lags"] == "4"


def test_zero_config_decoder_study_searches_the_default_space(tmp_path, tiny_session):
    output = invoke("tune", "decoder", "--data", tiny_session, "--target", "labels", "--experiment", "plain",
                    "--n-trials", 3, "--max-epochs", 3, "--pruner", "none", "--store", tmp_path / "store")
    assert "the decoder default space is searched" in output and "3 complete" in output
    runs = bnet.best_runs("plain", family="decoder", top=3, store=resolve_store(tmp_path / "store"))
    # every trial is scored on the frames the largest default window leaves
    assert {r.params["n_max_lags"] for r in runs} == {"8"}
    assert len({(r.params["learning_rate"], r.params["n_lags"]) for r in runs}) == 3
    assert all(r.params["max_n_epochs"] == "3" for r in runs)
    for run in runs:  # hidden units exist only with hidden layers
        assert (run.params["n_hid_layers"] == "0") == (run.params["n_hid_units"] == "0")

def test_an_lstm_study_takes_the_default_space_of_its_type(tmp_path, tiny_session):
    """model_type lstm alone: the default space without the MLP's window, and at least one
    LSTM layer in every trial; scored on the frames of the default window all the same."""
    config = tmp_path / "lstm.yaml"
    config.write_text("model: {model_type: lstm}\n")
    output = invoke("tune", "decoder", "--data", tiny_session, "--target", "labels", "--experiment", "lstm",
                    "--config", config, "--n-trials", 2, "--max-epochs", 2, "--pruner", "none",
                    "--store", tmp_path / "store")
    assert "2 complete" in output and "n_lags" not in output.split("searched:")[-1].splitlines()[0]
    runs = bnet.best_runs("lstm", family="decoder", top=2, store=resolve_store(tmp_path / "store"))
    assert {r.params["n_lags"] for r in runs} == {"0"} and {r.params["model_type"] for r in runs} == {"lstm"}
    assert all(int(r.params["n_hid_layers"]) >= 1 for r in runs)
    assert {r.params["n_max_lags"] for r in runs} == {"4"}


@pytest.mark.skipif(not M1.exists(), reason="the M1 recording is absent")
def test_an_lstm_decodes_and_labels_neural_encodes_the_real_m1_recording(tmp_path):
    """On real spikes: a bidirectional LSTM decodes hand velocity (held-out R2 well above 0),
    and the labels-neural encoder predicts held-out spike counts better than each neuron's
    constant training rate (Poisson log-likelihood per bin and neuron)."""
    session_path = build_m1_session(M1, tmp_path / "m1.hdf5")
    store = tmp_path / "store"
    (tmp_path / "lstm.yaml").write_text(
        "model: {model_class: neural-labels, model_type: lstm, n_hid_layers: 1, n_hid_units: 32, l2_reg: 1.0e-4}\n"
        "training: {learning_rate: 3.0e-3, max_n_epochs: 12}\ntuning: {n_trials: 1}\n")
    invoke("tune", "decoder", "--data", session_path, "--target", "labels", "--config", tmp_path / "lstm.yaml",
           "--experiment", "m1-lstm", "--store", store)
    resolved = resolve_store(store)
    (lstm,) = bnet.best_runs("m1-lstm", family="decoder", metric="val_r2", direction="maximize", store=resolved)
    assert lstm.params["model_type"] == "lstm" and lstm.metrics["test_r2"] > 0.5, lstm.metrics
    model = bnet.load_model(lstm.run_id, store=resolved)
    session = open_session(session_path, require=("neural", "labels"))
    import torch
    assert model.predict(torch.from_numpy(session.read("neural", 0).astype(np.float32))).shape == (100, 2)

    (tmp_path / "enc.yaml").write_text(
        "model: {model_class: labels-neural, n_lags: 3, n_hid_layers: 1, n_hid_units: 32, l2_reg: 1.0e-4}\n"
        "training: {learning_rate: 3.0e-3, max_n_epochs: 12}\ntuning: {n_trials: 1}\n")
    invoke("tune", "decoder", "--data", session_path, "--target", "labels", "--config", tmp_path / "enc.yaml",
           "--experiment", "m1-enc", "--store", store)
    (encoder,) = bnet.best_runs("m1-enc", family="decoder", metric="val_ll", direction="maximize", store=resolved)
    assert encoder.tags["bnet.target_kind"] == "counts" and encoder.params["noise_dist"] == "poisson"
    splits = bnet.split_trials(session.trials)
    from bnet.models.decoder_metrics import poisson_log_likelihood, score_trials
    mean_rates = np.concatenate([session.read("neural", t) for t in splits.train]).mean(axis=0)
    val_counts = [session.read("neural", t) for t in splits.val]
    constant = score_trials(poisson_log_likelihood, val_counts, [np.broadcast_to(mean_rates, c.shape) for c in val_counts],
                            3)
    assert encoder.metrics["val_ll"] > constant + 0.005, (encoder.metrics["val_ll"], constant)


def test_labels_with_missing_frames_are_refused(tmp_path):
    neural = {f"trial_{i:04d}": np.random.default_rng(i).poisson(1.0, (20, 4)).astype(float) for i in range(10)}
    labels = {k: np.random.default_rng(1).normal(size=(20, 2)) for k in neural}
    masks = {k: np.ones((20, 2)) for k in neural}
    masks["trial_0004"][7, 1] = 0
    path = write_session(tmp_path / "masked.hdf5", {"neural": neural, "labels": labels, "labels_masks": masks})
    store = tmp_path / "store"
    for model_class in ("neural-labels", "labels-neural"):
        (tmp_path / "c.yaml").write_text(f"model: {{model_class: {model_class}}}\n")
        result = run_cli("tune", "decoder", "--data", str(path), "--target", "labels",
                         "--config", str(tmp_path / "c.yaml"), "--experiment", "x",
                         "--n-trials", "1", "--store", str(store))
        assert_clean_failure(result, "masked.hdf5", "labels missing in 1 trial(s) (first trial_0004)", store=store)
