"""`bnet apply` on a second recording, and registered versions as MLflow Models (pyfunc)."""

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from bnet.data import SynthConfig, open_session, synthesize
from bnet.data.exports import read_export
from bnet.tracking import resolve_store
from bnet.tracking.registry import load_model
from conftest import assert_clean_failure, invoke, run_cli

# a session an AE learns in a few epochs (the tiny one's 16 px blobs take many more)
RECORDING = SynthConfig(n_trials=20, n_frames=30, y_pixels=32, x_pixels=32, n_neurons=10, n_states=3, seed=3)
AE_YAML = ("experiment: ae\nmodel: {model_type: conv, n_ae_latents: 4}\n"
           "training: {learning_rate: 0.001, max_n_epochs: 8, batch_size: null}\ntuning: {n_trials: 1}\n")
ARHMM_YAML = "experiment: seg\nmodel: {n_arhmm_states: 3, n_arhmm_lags: 1}\ntraining: {n_iters: 5}\ntuning: {n_trials: 1}\n"
DECODER_YAML = ("experiment: dec\nmodel: {n_lags: 1, n_hid_layers: 0}\n"
                "training: {learning_rate: 0.05, max_n_epochs: 80}\ntuning: {n_trials: 2}\n")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """An AE, an ARHMM over its latents and a decoder of labels, fitted to one recording and
    registered, and a second recording of the same animal (another recording seed)."""
    root = tmp_path_factory.mktemp("apply")
    store = root / "store"
    first = synthesize(root / "day1.hdf5", RECORDING)
    for name, text in (("ae", AE_YAML), ("arhmm", ARHMM_YAML), ("dec", DECODER_YAML)):
        (root / f"{name}.yaml").write_text(text)
    invoke("tune", "ae", "--data", first, "--config", root / "ae.yaml", "--store", store)
    invoke("register", "ae", "--experiment", "ae", "--name", "ae-tiny", "--store", store)
    invoke("tune", "arhmm", "--data", first, "--ae-experiment", "ae", "--config", root / "arhmm.yaml",
           "--store", store)
    invoke("register", "arhmm", "--experiment", "seg", "--name", "arhmm-tiny", "--store", store)
    invoke("tune", "decoder", "--data", first, "--target", "labels", "--config", root / "dec.yaml",
           "--store", store)
    invoke("register", "decoder", "--experiment", "dec", "--name", "dec-tiny", "--store", store)
    second = synthesize(root / "day2.hdf5", SynthConfig(**{**RECORDING.__dict__, "recording_seed": 1}))
    return {"root": root, "store": store, "resolved": resolve_store(store), "data": first, "second": second}


def _apply_runs(fitted, family, data=None):
    """The apply runs of a family (of one file)."""
    client = MlflowClient(fitted["resolved"].tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`bnet.family` = 'apply' and tags.`bnet.applied_family` = '{family}'")
    return [r for r in runs if data is None or r.data.tags["bnet.data_path"] == str(data)]


def test_a_second_recording_differs_from_the_first(fitted):
    with h5py.File(fitted["data"]) as a, h5py.File(fitted["second"]) as b:
        assert not np.array_equal(a["images/trial_0000"][()], b["images/trial_0000"][()])
        assert np.array_equal(a["ground_truth/params/neural_readout"][()], b["ground_truth/params/neural_readout"][()])


def test_apply_ae_writes_the_latents_its_model_computes(fitted):
    out = fitted["root"] / "out"
    output = invoke("apply", "ae", "models:/ae-tiny@champion", "--data", fitted["second"], "--out", out,
                    "--store", fitted["store"])
    assert "applied to 1 session(s)" in output
    session = open_session(fitted["second"])
    written = out / "synthetic_bnet-synth_seed3_day2.latents.hdf5"
    latents, splits = read_export(written, "latents")
    assert sorted(latents) == list(session.trials)
    assert splits.train and set(splits.train + splits.val + splits.test) <= set(session.trials)
    model = load_model("models:/ae-tiny@champion", fitted["resolved"])
    with torch.no_grad():
        expected = model.encode(torch.from_numpy(session.read("images", 5)).float() / 255).numpy()
    np.testing.assert_allclose(latents[5], expected, rtol=1e-5, atol=1e-6)
    run = next(r for r in _apply_runs(fitted, "ae", fitted["second"]) if r.info.run_id in output)
    tags, metrics = run.data.tags, run.data.metrics
    assert tags["bnet.upstream.ae_run_id"] == model.run.run_id
    assert tags["bnet.data_hash"] == session.data_hash
    assert tags["bnet.model_reference"] == "models:/ae-tiny@champion"
    with h5py.File(written) as f:
        assert f.attrs["run_id"] == run.info.run_id
    # a second recording of the animal is reconstructed about as well as the fitted one's test trials
    assert metrics["mse_vs_fitted_test"] < 1.5, metrics
    assert metrics["var_explained"] > 0.3, metrics
    lineage = invoke("lineage", written, "--store", fitted["store"])
    assert run.info.run_id in lineage and model.run.run_id in lineage and str(fitted["data"]) in lineage


def test_apply_pipeline_links_latents_and_states(fitted):
    out = fitted["root"] / "pipe"
    invoke("apply", "pipeline", "--arhmm", "models:/arhmm-tiny@champion", "--data", fitted["second"], "--out", out,
           "--store", fitted["store"])
    states, _ = read_export(out / "synthetic_bnet-synth_seed3_day2.states.hdf5", "states")
    probs, _ = read_export(out / "synthetic_bnet-synth_seed3_day2.states.hdf5", "probs")
    latents, _ = read_export(out / "synthetic_bnet-synth_seed3_day2.latents.hdf5", "latents")
    model = load_model("models:/arhmm-tiny@champion", fitted["resolved"])
    expected = model.engine.viterbi([latents[t].astype(np.float64) for t in sorted(latents)])
    for t, z in zip(sorted(latents), expected):
        np.testing.assert_array_equal(states[t], z.numpy())
        np.testing.assert_allclose(probs[t].sum(1), 1, atol=1e-5)
    state_run = next(r for r in _apply_runs(fitted, "arhmm") if r.data.tags["bnet.data_path"] == str(fitted["second"]))
    latents_run = state_run.data.tags["bnet.upstream.latents_run_id"]
    lineage = invoke("lineage", state_run.info.run_id, "--store", fitted["store"])
    assert latents_run in lineage and model.run.run_id in lineage
    assert state_run.data.metrics["mean_state_duration"] > 2  # the states persist, as the animal's did
    # the same latents through --latents give the same states
    output = invoke("apply", "arhmm", "models:/arhmm-tiny@champion", "--latents",
                    out / "synthetic_bnet-synth_seed3_day2.latents.hdf5", "--out", fitted["root"] / "again",
                    "--store", fitted["store"])
    again, _ = read_export(next((fitted["root"] / "again").glob("*.states.hdf5")), "states")
    assert all(np.array_equal(again[t], states[t]) for t in states)
    # the file names the run that wrote it: lineage goes through it to the AE's apply run
    again_run = next(r for r in _apply_runs(fitted, "arhmm") if r.info.run_id in output)
    assert again_run.data.tags["bnet.upstream.latents_run_id"] == latents_run


def test_apply_decoder_predicts_labels_of_a_new_recording(fitted):
    invoke("apply", "decoder", "models:/dec-tiny@champion", "--data", fitted["second"], "--out",
           fitted["root"] / "dec", "--store", fitted["store"])
    predictions, _ = read_export(next((fitted["root"] / "dec").glob("*.predictions.hdf5")), "predictions")
    model = load_model("models:/dec-tiny@champion", fitted["resolved"])
    neural = open_session(fitted["second"]).read("neural", 2)
    np.testing.assert_allclose(predictions[2], model.predict(torch.from_numpy(neural)).numpy(), rtol=1e-5, atol=1e-6)
    (run,) = [r for r in _apply_runs(fitted, "decoder", fitted["second"])
              if r.data.tags["bnet.model_reference"] == "models:/dec-tiny@champion"]
    # the same animal's neurons: the labels of the new recording are decoded about as well
    assert run.data.metrics["r2"] > 0.5, run.data.metrics


def test_apply_an_ensemble_of_decoders(fitted, tmp_path):
    invoke("ensemble", "--experiment", "dec", "--max-members", 2, "--name", "dec-ens", "--store", fitted["store"])
    invoke("apply", "decoder", "models:/dec-ens@champion", "--data", fitted["second"], "--out", tmp_path,
           "--store", fitted["store"])
    predictions, _ = read_export(next(tmp_path.glob("*.predictions.hdf5")), "predictions")
    ensemble = load_model("models:/dec-ens@champion", fitted["resolved"])
    neural = open_session(fitted["second"]).read("neural", 3)
    expected = ensemble.predict(torch.from_numpy(neural)).numpy()
    np.testing.assert_allclose(predictions[3], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_pyfunc(fitted, "dec-ens").predict(neural), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change, command, fragments", [
    ({"y_pixels": 24}, "ae", ["frames are 1x24x32", "reads 1x32x32", "--y-pixels 32"]),
    ({"n_neurons": 7}, "decoder", ["7 neurons", "reads 10"]),
])
def test_a_session_the_model_cannot_read_is_refused(fitted, tmp_path, change, command, fragments):
    other = synthesize(tmp_path / "other.hdf5", SynthConfig(**{**RECORDING.__dict__, **change}))
    before = len(_apply_runs(fitted, command))
    ref = {"ae": "models:/ae-tiny@champion", "decoder": "models:/dec-tiny@champion"}[command]
    result = run_cli("apply", command, ref, "--data", other, "--store", fitted["store"])
    assert_clean_failure(result, str(other), *fragments)
    assert len(_apply_runs(fitted, command)) == before, "a refused session left a run"


def test_latents_of_another_dimension_are_refused(fitted, tmp_path):
    path = tmp_path / "latents.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("latents/trial_0000", data=np.zeros((20, 7), np.float32))
        for split in ("train", "val", "test"):
            f.create_dataset(f"splits/{split}", data=np.zeros(0, np.int64))
    result = run_cli("apply", "arhmm", "models:/arhmm-tiny@champion", "--latents", path, "--store", fitted["store"])
    assert_clean_failure(result, str(path), "7-dimensional", "segments 4 dimensions")


@pytest.mark.slow
def test_sessions_spread_over_workers_give_the_same_latents(fitted, tmp_path):
    third = synthesize(tmp_path / "day3.hdf5", SynthConfig(**{**RECORDING.__dict__, "recording_seed": 2}))
    short = synthesize(tmp_path / "day4.hdf5", SynthConfig(**{**RECORDING.__dict__, "recording_seed": 3,
                                                              "n_trials": 4}))
    output = invoke("apply", "ae", "models:/ae-tiny@champion", "--data", fitted["second"], "--data", third,
                    "--data", short, "--n-workers", "2", "--out", tmp_path / "workers", "--store", fitted["store"])
    invoke("apply", "ae", "models:/ae-tiny@champion", "--data", third, "--out", tmp_path / "alone",
           "--store", fitted["store"])
    latents, _ = read_export(tmp_path / "workers" / "synthetic_bnet-synth_seed3_day3.latents.hdf5", "latents")
    alone, _ = read_export(tmp_path / "alone" / "synthetic_bnet-synth_seed3_day3.latents.hdf5", "latents")
    assert all(np.allclose(latents[t], alone[t], atol=1e-6) for t in alone)
    assert "applied to 3 session(s)" in output
    # a session shorter than one block of the model's splits: all its trials are test trials
    _, splits = read_export(tmp_path / "workers" / "synthetic_bnet-synth_seed3_day4.latents.hdf5", "latents")
    assert splits.test == (0, 1, 2, 3) and not splits.train


# --- registered versions are MLflow Models ---------------------------------------------------

def _pyfunc(fitted, name):
    mlflow.set_tracking_uri(fitted["resolved"].tracking_uri)
    try:
        return mlflow.pyfunc.load_model(f"models:/{name}@champion")
    finally:
        mlflow.set_tracking_uri(None)


def test_pyfunc_models_answer_as_bnet_does(fitted):
    session = open_session(fitted["second"])
    frames = session.read("images", 1).astype(np.float32) / 255
    ae = load_model("models:/ae-tiny@champion", fitted["resolved"])
    latents = _pyfunc(fitted, "ae-tiny").predict(frames)
    with torch.no_grad():
        np.testing.assert_allclose(latents, ae.encode(torch.from_numpy(frames)).numpy(), rtol=1e-5, atol=1e-6)

    arhmm = load_model("models:/arhmm-tiny@champion", fitted["resolved"])
    table = _pyfunc(fitted, "arhmm-tiny").predict(latents)
    np.testing.assert_array_equal(table["state"].to_numpy(), arhmm.engine.viterbi([latents.astype(np.float64)])[0])
    assert list(table.columns) == ["state", "p_state_0", "p_state_1", "p_state_2"]

    neural = session.read("neural", 1).astype(np.float32)
    decoder = load_model("models:/dec-tiny@champion", fitted["resolved"])
    np.testing.assert_allclose(_pyfunc(fitted, "dec-tiny").predict(neural),
                               decoder.predict(torch.from_numpy(neural)).numpy(), rtol=1e-5, atol=1e-6)


def test_a_pyfunc_model_has_a_signature_and_refuses_other_frames(fitted):
    model = _pyfunc(fitted, "ae-tiny")
    inputs = model.metadata.get_input_schema().inputs[0]
    assert inputs.shape == (-1, 1, 32, 32)
    assert model.metadata.get_output_schema().inputs[0].shape == (-1, 4)
    with pytest.raises(Exception, match="shape"):
        model.predict(np.zeros((2, 1, 24, 32), np.float32))


def test_loading_a_pyfunc_model_unpickles_nothing(fitted, tmp_path, monkeypatch):
    client = MlflowClient(fitted["resolved"].tracking_uri)
    version = client.get_model_version_by_alias("ae-tiny", "champion")
    folder = Path(mlflow.artifacts.download_artifacts(version.source, dst_path=str(tmp_path / "model"),
                                                      tracking_uri=fitted["resolved"].tracking_uri))
    assert not list(folder.rglob("*.pkl")), "the model holds a pickle"

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    original = torch.load

    def weights_only_load(*args, **kwargs):
        assert kwargs.get("weights_only") is True, "torch.load without weights_only=True"
        return original(*args, **kwargs)

    import cloudpickle
    for module, name in ((pickle, "load"), (pickle, "loads"), (cloudpickle, "load"), (cloudpickle, "loads")):
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(torch, "load", weights_only_load)
    frames = np.full((1, 1, 32, 32), 0.5, np.float32)
    assert mlflow.pyfunc.load_model(str(folder)).predict(frames).shape == (1, 4)
    monkeypatch.undo()

    # a checkpoint swapped for a pickle that runs code when unpickled is refused, its code never run
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"state_dict": Payload()}, folder / "artifacts" / "model.pt")
    with pytest.raises(Exception, match="not a bnet checkpoint"):
        mlflow.pyfunc.load_model(str(folder))
    assert not marker.exists()


@pytest.mark.slow
def test_mlflow_models_predict_runs_a_registered_version(fitted, tmp_path):
    frames = open_session(fitted["second"]).read("images", 0)[:3].astype(np.float32) / 255
    (tmp_path / "input.json").write_text('{"inputs": ' + str(frames.tolist()) + "}")
    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": fitted["resolved"].tracking_uri}
    result = subprocess.run([str(Path(sys.executable).with_name("mlflow")), "models", "predict", "-m",
                             "models:/ae-tiny@champion", "-i", str(tmp_path / "input.json"), "-t", "json",
                             "--env-manager", "local", "-o", str(tmp_path / "out.json")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    import json
    predicted = np.array(json.loads((tmp_path / "out.json").read_text())["predictions"])
    ae = load_model("models:/ae-tiny@champion", fitted["resolved"])
    with torch.no_grad():
        np.testing.assert_allclose(predicted, ae.encode(torch.from_numpy(frames)).numpy(), rtol=1e-4, atol=1e-5)
    shutil.rmtree(tmp_path)


def test_movies_of_a_session_the_models_never_saw(fitted, tmp_path):
    output = invoke("plot", "reconstruction", "models:/ae-tiny@champion", "--data", fitted["second"], "--trials", 1,
                    "--out", tmp_path / "r.gif", "--store", fitted["store"])
    assert "trials of day2.hdf5, new to the model" in output and (tmp_path / "r.gif").stat().st_size > 0
    output = invoke("plot", "syllables", "models:/arhmm-tiny@champion", "--data", fitted["second"], "--clips", 1,
                    "--out", tmp_path / "s.gif", "--store", fitted["store"])
    assert "in day2.hdf5, new to the models" in output and (tmp_path / "s.gif").stat().st_size > 0
    other = synthesize(tmp_path / "big.hdf5", SynthConfig(**{**RECORDING.__dict__, "x_pixels": 40}))
    result = run_cli("plot", "reconstruction", "models:/ae-tiny@champion", "--data", other, "--out",
                     tmp_path / "x.gif", "--store", fitted["store"])
    assert_clean_failure(result, "frames are 1x32x40", "reads 1x32x32")


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_an_arhmm_version(fitted, tmp_path):
    import json
    import os
    import socket
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # the scoring server is uvicorn, which MLflow finds on PATH: bnet's environment's
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "MLFLOW_TRACKING_URI": fitted["resolved"].tracking_uri,
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m",
                               "models:/arhmm-tiny@champion", "--env-manager", "local", "-p", str(port),
                               "-h", "127.0.0.1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    try:
        latents = load_model("models:/arhmm-tiny@champion", fitted["resolved"]).engine.sample(30)[1][0].numpy()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": latents.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        deadline = time.monotonic() + 120
        while True:
            try:
                answer = json.loads(urllib.request.urlopen(request, timeout=10).read())["predictions"]
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-3000:]
                assert time.monotonic() < deadline, "mlflow models serve did not answer in 120 s"
                time.sleep(1)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
        server.wait(30)
    model = load_model("models:/arhmm-tiny@champion", fitted["resolved"])
    expected = model.engine.viterbi([latents.astype(np.float64)])[0].numpy()
    assert [row["state"] for row in answer] == expected.tolist()
    assert all(abs(sum(v for k, v in row.items() if k.startswith("p_state_")) - 1) < 1e-4 for row in answer)


def test_runs_logged_before_checkpoints_were_mlflow_models_still_load(tmp_path):
    from bnet.models import build_model
    from bnet.models.ae import AEConfig
    from bnet.models.checkpoint import save_checkpoint
    from bnet.tracking.store import connect, ensure_experiment

    store = resolve_store(tmp_path / "store")
    client = connect(store)
    run = client.create_run(ensure_experiment(client, store, "old"), tags={"bnet.family": "ae"})
    model = build_model(AEConfig(model_class="ae", n_ae_latents=3, y_pixels=16, x_pixels=16))
    client.log_artifact(run.info.run_id, str(save_checkpoint(tmp_path / "model.pt", model)), "checkpoint")
    loaded = load_model(run.info.run_id, store)
    frames = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        np.testing.assert_allclose(loaded.encode(frames).numpy(), model.eval().encode(frames).numpy(), atol=1e-6)


def test_a_file_that_fails_fails_alone(fitted, tmp_path):
    other = synthesize(tmp_path / "other.hdf5", SynthConfig(**{**RECORDING.__dict__, "y_pixels": 24}))
    before = len(_apply_runs(fitted, "ae", fitted["second"]))
    result = run_cli("apply", "ae", "models:/ae-tiny@champion", "--data", other, "--data", fitted["second"],
                     "--store", fitted["store"])
    assert_clean_failure(result, "1 of 2 file(s) failed (1 applied)", "other.hdf5", "frames are 1x24x32")
    assert len(_apply_runs(fitted, "ae", fitted["second"])) == before + 1
