"""`bnet tune arhmm`: upstream resolution, tracking, exports, bad input, and a science check."""

import json

import h5py
import mlflow
import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient
from scipy.optimize import linear_sum_assignment

import bnet
from bnet.data import SynthConfig, open_session, read_ground_truth, split_trials, synthesize
from bnet.errors import DataError
from bnet.models.arhmm import ARHMM, ARHMMConfig
from bnet.tracking import resolve_store
from bnet.tuning.families.arhmm import Observations, check_observations
from conftest import assert_clean_failure, frames, invoke, run_cli, write_session

AE_YAML = """
experiment: ae-up
model: {model_type: linear, n_ae_latents: 3}
training: {learning_rate: 0.003, max_n_epochs: 3}
tuning: {n_trials: 1, pruner: none}
"""
ARHMM_YAML = """
experiment: arhmm-test
model:
  n_arhmm_states: [2, 3]
  n_arhmm_lags: 1
  transitions: [stationary, sticky]
  kappa: {low: 1.0, high: 100.0, log: true}
training: {n_iters: 8}
tuning: {n_trials: 3, pruner: none, seed: 0}
"""


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, tiny_session):
    root = tmp_path_factory.mktemp("arhmm")
    (root / "ae.yaml").write_text(AE_YAML)
    (root / "arhmm.yaml").write_text(ARHMM_YAML)
    store = root / "store"
    invoke("tune", "ae", "--data", tiny_session, "--config", root / "ae.yaml", "--store", store)
    output = invoke("tune", "arhmm", "--data", tiny_session, "--ae-experiment", "ae-up", "--ae", "best",
                    "--config", root / "arhmm.yaml", "--store", store)
    return {"root": root, "store": store, "output": output, "data": tiny_session}


@pytest.mark.slow
def test_arhmm_study_over_best_ae_latents(upstream, tmp_path):
    resolved = resolve_store(upstream["store"])
    client = MlflowClient(resolved.tracking_uri)
    ae_run = bnet.best_runs("ae-up", family="ae", store=resolved)[0]
    runs = bnet.best_runs("arhmm-test", family="arhmm", top=5, metric="val_ll_per_step",
                          direction="maximize", store=resolved)
    assert len(runs) == 3
    scores = [r.metrics["val_ll_per_step"] for r in runs]
    assert scores == sorted(scores, reverse=True)
    best = runs[0]
    assert best.tags["bnet.upstream.ae_run_id"] == ae_run.run_id
    assert best.tags["bnet.data_hash"] == ae_run.tags["bnet.data_hash"]
    assert {"test_ll_per_step", "median_state_duration", "state_usage_0", "best_iteration"} <= set(best.metrics)
    history = client.get_metric_history(best.run_id, "val_ll")
    assert len(history) >= 2 and [m.step for m in history][:2] == [1, 2]
    # the selected iteration's val score is the run's val_ll_per_step
    assert max(m.value for m in history) == pytest.approx(best.metrics["val_ll_per_step"], rel=1e-9) or \
        best.metrics["best_iteration"] == 0
    # kappa is a dimension of sticky trials only (define-by-run); the others ran, and logged, kappa = 0
    study = optuna.load_study(study_name="arhmm-test", storage=resolved.optuna_storage)
    by_run = {t.user_attrs["mlflow_run_id"]: t for t in study.trials}
    assert {r.params["transitions"] for r in runs} == {"sticky", "stationary"}
    for run in runs:
        sticky = run.params["transitions"] == "sticky"
        assert ("kappa" in by_run[run.run_id].params) == sticky
        assert (float(run.params["kappa"]) > 0) == sticky
    plots = {a.path for a in client.list_artifacts(best.run_id, "plots")}
    assert {"plots/state_raster.png", "plots/state_durations.png", "plots/transition_matrix.png",
            "plots/ar_dynamics.png"} <= plots

    local = mlflow.artifacts.download_artifacts(run_id=best.run_id, artifact_path="exports/states.hdf5",
                                                dst_path=str(tmp_path), tracking_uri=resolved.tracking_uri)
    session = open_session(upstream["data"])
    K = int(best.params["n_arhmm_states"])
    with h5py.File(local) as f:
        assert len(f["states"]) == session.n_trials
        z, p = f["states/trial_0000"][()], f["probs/trial_0000"][()]
        assert z.shape == (20,) and p.shape == (20, K) and z.max() < K
        assert np.allclose(p.sum(1), 1)
        assert list(f["splits/val"][()]) == list(split_trials(session.trials).val)

    # the saved parameters are the ones that earned the logged score
    model = bnet.load_model(best.run_id, store=resolved)
    latents_path = mlflow.artifacts.download_artifacts(run_id=ae_run.run_id, artifact_path="exports/latents.hdf5",
                                                       dst_path=str(tmp_path / "ae"), tracking_uri=resolved.tracking_uri)
    with h5py.File(latents_path) as f:
        val = [f[f"latents/trial_{t:04d}"][()] for t in split_trials(session.trials).val]
    assert model.engine.log_likelihood_per_step(val) == pytest.approx(best.metrics["val_ll_per_step"], rel=1e-9)

    listed = json.loads(invoke("best", "arhmm", "--experiment", "arhmm-test", "--json", "--store", upstream["store"]))
    assert listed[0]["run_id"] == best.run_id
    assert "version 1" in invoke("register", "arhmm", "--experiment", "arhmm-test", "--name", "seg",
                                 "--store", upstream["store"])
    assert bnet.load_model("models:/seg@champion", store=resolved).run.run_id == best.run_id


@pytest.mark.slow
@pytest.mark.parametrize("model_class, n_lags", [("arhmm-labels", "1"), ("hmm-labels", "0")])
def test_labels_studies(tmp_path, tiny_session, model_class, n_lags):
    """--labels means arhmm-labels; a -labels class in the config says the same without it,
    and hmm-labels drops the lags the default space would search."""
    store = tmp_path / "store"
    if model_class == "arhmm-labels":
        options = ["--labels"]
    else:
        (tmp_path / "hmm.yaml").write_text("model: {model_class: hmm-labels, n_arhmm_states: [2, 3]}")
        options = ["--config", tmp_path / "hmm.yaml"]
    output = invoke("tune", "arhmm", "--data", tiny_session, *options, "--experiment", "labels-seg",
                    "--n-trials", 1, "--max-iters", 3, "--store", store)
    assert "1 complete" in output
    run = bnet.best_runs("labels-seg", family="arhmm", metric="val_ll_per_step", direction="maximize",
                         store=resolve_store(store))[0]
    assert run.tags["bnet.model_class"] == model_class and "bnet.upstream.ae_run_id" not in run.tags
    assert run.params["n_dims"] == "4" and run.params["n_arhmm_lags"] == n_lags
    model = bnet.load_model(run.run_id, store=resolve_store(store))
    assert model.config.model_class == model_class


@pytest.mark.slow
@pytest.mark.parametrize("ae_ref, fragment", [
    ("0123456789abcdef0123456789abcdef", "no run with id '0123456789abcdef0123456789abcdef'"),
    ("models:/nothing@champion", "'models:/nothing@champion' does not resolve"),
    ("arhmm-run", "a arhmm run, not ae"),
])
def test_ae_reference_that_resolves_to_nothing_or_the_wrong_family(upstream, ae_ref, fragment):
    resolved = resolve_store(upstream["store"])
    if ae_ref == "arhmm-run":
        ae_ref = bnet.best_runs("arhmm-test", family="arhmm", metric="val_ll_per_step", direction="maximize",
                                store=resolved)[0].run_id
    result = run_cli("tune", "arhmm", "--data", str(upstream["data"]), "--ae", ae_ref,
                     "--experiment", "never-created", "--n-trials", "1", "--store", str(upstream["store"]))
    assert_clean_failure(result, fragment)
    assert MlflowClient(resolved.tracking_uri).get_experiment_by_name("never-created") is None


@pytest.mark.slow
def test_ae_best_in_an_experiment_without_ae_runs(upstream):
    result = run_cli("tune", "arhmm", "--data", str(upstream["data"]), "--ae", "best",
                     "--ae-experiment", "arhmm-test", "--experiment", "never-created",
                     "--n-trials", "1", "--store", str(upstream["store"]))
    assert_clean_failure(result, "experiment 'arhmm-test' has no finished ae runs")


@pytest.mark.parametrize("yaml_text, fragments", [
    ("model: {n_arhmm_states: 3, transitions: stationary, kappa: 100}", ["kappa=100", "transitions='sticky'"]),
    ("model: {n_arhmm_states: 500}", ["n_arhmm_states=500 is more than the", "training frames"]),
    ("model: {n_arhmm_states: 2, n_arhmm_lags: 20}", ["n_arhmm_lags=20 is not less than the shortest trial (20 frames)"]),
    ("model: {n_arhmm_states: 2, noise_type: laplace}", ["noise_type must be one of"]),
    ("model: {model_class: [arhmm-labels, ae]}", ["model_class 'ae' is not a segmentation model"]),
    ("model: {model_class: hmm}", ["--labels segments labels, but model_class 'hmm' fits AE latents"]),
    ("model: {model_class: [hmm-labels, arhmm]}", ["a study segments either labels", "or AE latents"]),
    ("model: {model_class: hmm-labels, n_arhmm_lags: 2}", ["'hmm-labels' has no AR dynamics"]),
])
def test_bad_arhmm_configs_fail_before_anything_is_logged(tmp_path, tiny_session, yaml_text, fragments):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    store = tmp_path / "store"
    result = run_cli("tune", "arhmm", "--data", str(tiny_session), "--labels", "--experiment", "x",
                     "--n-trials", "1", "--config", str(config), "--store", str(store))
    assert_clean_failure(result, *fragments, store=store)


def test_nan_observations_name_the_trial(tmp_path):
    images = {f"trial_{i:04d}": frames(10) for i in range(10)}
    labels = {f"trial_{i:04d}": np.ones((10, 2)) for i in range(10)}
    labels["trial_0006"][4, 1] = np.nan
    path = write_session(tmp_path / "nan.hdf5", {"images": images, "labels": labels})
    store = tmp_path / "store"
    result = run_cli("tune", "arhmm", "--data", str(path), "--labels", "--experiment", "x",
                     "--n-trials", "1", "--store", str(store))
    assert_clean_failure(result, "nan.hdf5", "trial_0006 has NaN or infinite labels (frame 4)", store=store)
    latents = Observations({3: np.array([[0.0, np.nan]])}, split_trials(list(range(10))), "latent")
    with pytest.raises(DataError, match="trial_0003 has NaN or infinite latents"):
        check_observations(latents, "AE run abc")


def test_arhmm_recovers_true_states_from_true_latents(tmp_path):
    """Science check: on the generator's own latents the states come back (>= 95%)."""
    path = synthesize(tmp_path / "s.hdf5", SynthConfig(n_trials=20, n_frames=100, y_pixels=8, x_pixels=8,
                                                       n_neurons=0, n_states=4, seed=1))
    states = read_ground_truth(path, "states")
    latents = read_ground_truth(path, "latents")
    model = ARHMM(ARHMMConfig(n_arhmm_states=4, n_arhmm_lags=1, transitions="sticky", kappa=100.0,
                              n_iters=50, arhmm_es_tol=1e-7))
    model.fit(latents[:16], val_sequences=latents[16:])
    found = np.concatenate([z.numpy() for z in model.viterbi(latents[16:])])
    true = np.concatenate(states[16:])
    overlap = np.zeros((4, 4))
    np.add.at(overlap, (true, found), 1)
    rows, cols = linear_sum_assignment(-overlap)
    assert overlap[rows, cols].sum() / len(true) >= 0.95


@pytest.mark.slow
def test_syllable_movie(upstream, tmp_path):
    resolved = resolve_store(upstream["store"])
    run = bnet.best_runs("arhmm-test", family="arhmm", metric="val_ll_per_step", direction="maximize", store=resolved)[0]
    out = tmp_path / "syllables.gif"
    output = invoke("plot", "syllables", run.run_id, "--out", out, "--min-frames", 1, "--clips", 2,
                    "--store", upstream["store"])
    assert "wrote" in output and out.stat().st_size > 1000
    from PIL import Image
    with Image.open(out) as movie:
        assert movie.n_frames > 5
    # mp4 goes through imageio-ffmpeg's own binary, whether or not an ffmpeg is on the PATH
    invoke("plot", "syllables", run.run_id, "--out", tmp_path / "m.mp4", "--min-frames", 1, "--clips", 2,
           "--store", upstream["store"])
    assert (tmp_path / "m.mp4").read_bytes()[4:8] == b"ftyp"


def test_engine_ssm_without_ssm_is_a_clear_error(tmp_path, tiny_session):
    from bnet.errors import ConfigError
    from bnet.models.arhmm.ssm_engine import import_ssm

    try:
        import_ssm()
        pytest.skip("ssm is importable here: the guard cannot be exercised")
    except ConfigError:
        pass
    store = tmp_path / "store"
    result = run_cli("tune", "arhmm", "--data", str(tiny_session), "--labels", "--engine", "ssm",
                     "--experiment", "x", "--n-trials", "1", "--store", str(store))
    assert_clean_failure(result, "engine 'ssm' asked for, but ssm cannot be imported", store=store)


def test_ssm_parameters_move_into_the_bnet_engine():
    """The conversion from a fitted ssm.HMM's attributes, checked on ssm's own reference fit."""
    from types import SimpleNamespace

    from bnet.models.arhmm.ssm_engine import parameters_from_ssm
    from conftest import SHARED

    path = SHARED / "reference" / "arhmm" / "arhmm_robust_ar_sticky_lags1.npz"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    ref = np.load(path, allow_pickle=False)
    hmm = SimpleNamespace(
        init_state_distn=SimpleNamespace(log_pi0=ref["fit_log_pi0"]),
        transitions=SimpleNamespace(log_Ps=ref["fit_log_Ps"]),
        observations=SimpleNamespace(As=ref["fit_As"], bs=ref["fit_bs"], Sigmas=ref["fit_Sigmas"], nus=ref["fit_nus"]),
    )
    config = ARHMMConfig(n_arhmm_states=int(ref["K"]), n_arhmm_lags=1, noise_type="studentst", dtype="float64",
                         transitions="sticky", kappa=float(ref["kappa"]))
    model = parameters_from_ssm(config, hmm)
    test = [ref["test_x"][i, :n] for i, n in enumerate(ref["test_lengths"])]
    assert model.log_likelihood(test) == pytest.approx(float(ref["ll_test_fit"]), rel=1e-10)
