"""Every class of the AE family through `bnet tune ae`, multi-session data and the
family's study options, on real SQLite stores and HDF5 files."""

import json
import math
from pathlib import Path

import h5py
import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from bnet.config import dataclass_from_values
from bnet.data import SynthConfig, TrialBatches, open_session, synthesize
from bnet.data.datasets import SessionBatches
from bnet.data.build import BuildConfig, build_session
from bnet.data.sessions import select_sessions
from bnet.errors import ConfigError, DataError
from bnet.models import build_model, model_classes, model_entry
from bnet.models.serving import reads_labels as model_reads_labels
from bnet.tracking import resolve_store
from bnet.tuning.families.ae import DEFAULT_SHIFT
from bnet.tracking.registry import load_model
from bnet.training import TrainingConfig, evaluate, fit
from conftest import invoke

pytestmark = pytest.mark.slow

CLASSES = {
    "ae": {}, "vae": {"vae.beta": 0.5, "vae.beta_anneal_epochs": 2},
    "beta-tcvae": {"beta_tcvae.beta": 4.0}, "cond-ae": {}, "cond-vae": {"conditional_encoder": True},
    "cond-ae-msp": {"msp.alpha": 0.1}, "ps-vae": {"ps_vae.alpha": 10.0, "ps_vae.anneal_epochs": 2},
    "labels-images": {},
}
TERMS = {
    "ae": ["pixel_mse"], "vae": ["frame_nll", "kl"], "beta-tcvae": ["mi", "tc", "dwkl"], "cond-ae": ["pixel_mse"],
    "cond-vae": ["kl"], "cond-ae-msp": ["label_mse", "msp_subspace"],
    "ps-vae": ["label_nll", "label_mse", "kl_supervised", "mi", "tc", "dwkl"], "labels-images": ["pixel_mse"],
}


def write_config(path, model, tuning="n_trials: 1", data=""):
    lines = [f"  {k}: {json.dumps(v)}" for k, v in model.items()]
    path.write_text("model:\n" + "\n".join(lines) + "\ntraining: {max_n_epochs: 2, min_n_epochs: 2, batch_size: 10}\n"
                    + (f"data:\n{data}\n" if data else "") + f"tuning: {{{tuning}}}\n")
    return path


def trial_runs(store, experiment):
    resolved = resolve_store(store)
    client = MlflowClient(resolved.tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`bnet.role` = 'trial'")
    return client, resolved, runs


@pytest.mark.parametrize("model_class", list(CLASSES))
def test_every_class_tunes_logs_its_terms_and_loads_from_the_registry(tmp_path, tiny_session, model_class):
    another_class_key = {"vae.beta": 2.0} if model_class == "ae" else {}
    config = write_config(tmp_path / "c.yaml", {"model_class": model_class, "n_ae_latents": 6, **CLASSES[model_class],
                                                **another_class_key})
    store = tmp_path / "store"
    result = invoke("tune", "ae", "--data", tiny_session, "--config", config, "--store", store, "--experiment", "fam")
    client, resolved, runs = trial_runs(store, "fam")
    (run,) = runs
    assert run.info.status == "FINISHED", run.data.tags.get("bnet.error")
    if another_class_key:  # a class's params are its own hyperparameters: no vae.beta on an ae
        assert "note: model_class ae takes no vae.beta: accepted and ignored" in result
        assert "vae.beta" not in run.data.params and "n_ae_latents" in run.data.params
    # training frames move by default, except for classes whose labels would not move with them
    reads_labels = model_entry(model_class).builder.uses_labels
    assert float(run.data.params["augment_shift"]) == (0 if reads_labels else DEFAULT_SHIFT)
    assert float(run.data.params["augment_rotation"]) == 0  # the synthetic frames do not follow an animal
    for term in TERMS[model_class]:
        assert f"best_val_{term}" in run.data.metrics and f"test_{term}" in run.data.metrics, term
        assert len(client.get_metric_history(run.info.run_id, f"val_{term}")) == 2, term
    for name, value in CLASSES[model_class].items():
        recorded = run.data.params[name]
        assert recorded == str(value) if isinstance(value, bool) else float(recorded) == float(value), name
    if model_class in ("cond-ae-msp", "ps-vae"):
        assert "val_label_r2" in run.data.metrics
    if model_class == "ps-vae":
        assert 0 <= run.data.metrics["val_unsup_corr"] <= 1
        plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert {"plots/label_reconstructions.png", "plots/latent_traversals.png",
                "plots/latent_traversals.mp4"} <= plots
    invoke("register", "ae", "--experiment", "fam", "--name", f"fam-{model_class}", "--store", store)
    model = load_model(f"models:/fam-{model_class}@champion", resolved)
    assert model.config.model_class == model_class
    # every class is an MLflow Model too, reading labels by name where it reads them
    version = client.get_model_version_by_alias(f"fam-{model_class}", "champion")
    pyfunc = mlflow.pyfunc.load_model(mlflow.artifacts.download_artifacts(version.source, dst_path=str(tmp_path / "m"),
                                                                          tracking_uri=resolved.tracking_uri))
    session = open_session(tiny_session)
    frames = session.read("images", 0)[:4].astype(np.float32) / 255
    labels = session.read("labels", 0)[:4].astype(np.float32)
    if not model.has_encoder:  # labels-images: labels in, frames out
        with torch.no_grad():
            expected = model.decode(torch.from_numpy(labels)).numpy()
        np.testing.assert_allclose(pyfunc.predict(labels), expected, rtol=1e-4, atol=1e-5)
        return
    named = pyfunc.metadata.get_input_schema().has_input_names()
    assert named == model_reads_labels(model)
    latents = pyfunc.predict({"frames": frames, "labels": labels} if named else frames)
    with torch.no_grad():
        expected = model.encode(torch.from_numpy(frames), None, torch.from_numpy(labels) if named else None)
    np.testing.assert_allclose(latents, expected.numpy(), rtol=1e-4, atol=1e-5)


def _group(root, n=2, y=16):
    """Sessions data_dir/lab/expt/animal/sess-k with different seeds (a different 'lighting')."""
    for k in range(n):
        synthesize(root / "lab" / "expt" / "mouse" / f"sess-{k}" / "data.hdf5",
                   SynthConfig(n_trials=10, n_frames=20, y_pixels=y, x_pixels=y, n_neurons=5, n_states=2, seed=10 + k))
    return root


def test_session_selection_follows_behavenet(tmp_path):
    root = _group(tmp_path / "data", 3)
    values = {"data_dir": str(root), "lab": "lab", "expt": "expt", "animal": "mouse", "session": "all"}
    group = select_sessions(values, ("images",))
    assert [s.dataset_id for s in group.sessions] == [f"lab/expt/mouse/sess-{k}" for k in range(3)]
    # the first 'all' from the top wins: the levels below it are ignored
    assert len(select_sessions({**values, "animal": "all", "session": "sess-0"}, ("images",)).sessions) == 3
    csv = tmp_path / "sessions.csv"
    csv.write_text("lab,expt,animal,session,save_dir\nlab,expt,mouse,sess-2,x\nlab,expt,mouse,sess-0,x\n")
    ordered = select_sessions({**values, "sessions_csv": str(csv)}, ("images",))
    assert [s.dataset_id.split("/")[-1] for s in ordered.sessions] == ["sess-2", "sess-0"]  # the CSV's order
    (tmp_path / "swapped.csv").write_text("lab,expt,animal,session\nlab,expt,mouse,sess-0\nlab,expt,mouse,sess-2\n")
    swapped = select_sessions({**values, "sessions_csv": str(tmp_path / "swapped.csv")}, ("images",))
    assert ordered.data_hash != swapped.data_hash  # the order gives the indices: another model
    with pytest.raises(ConfigError, match="'lab: all' is refused"):
        select_sessions({**values, "lab": "all"}, ("images",))
    with pytest.raises(ConfigError, match="lacks column"):
        (tmp_path / "bad.csv").write_text("lab,expt,session\nlab,expt,sess-0\n")
        select_sessions({**values, "sessions_csv": str(tmp_path / "bad.csv")}, ("images",))
    (tmp_path / "missing.csv").write_text("lab,expt,animal,session\nlab,expt,mouse,sess-9\n")
    with pytest.raises(DataError, match="sess-9 has no data file"):
        select_sessions({**values, "sessions_csv": str(tmp_path / "missing.csv")}, ("images",))
    fitted = select_sessions({**values, "all_source": "save"}, ("images",),
                             fitted_sessions=lambda: {"lab/expt/mouse/sess-1", "other/expt/mouse/sess-0"})
    assert [s.dataset_id for s in fitted.sessions] == ["lab/expt/mouse/sess-1"]


def test_multi_session_msps_vae_exports_each_session_under_its_own_name(tmp_path):
    root = _group(tmp_path / "data", 2)
    data = (f"  data_dir: {root}\n  lab: lab\n  expt: expt\n  animal: mouse\n  session: all\n  all_source: data")
    config = write_config(tmp_path / "m.yaml", {"model_class": "msps-vae", "n_ae_latents": 8, "n_background": 2,
                                               "n_sessions_per_batch": 2, "fit_sess_io_layers": True}, data=data)
    store = tmp_path / "store"
    invoke("tune", "ae", "--config", config, "--store", store, "--experiment", "multi")
    client, resolved, (run,) = trial_runs(store, "multi")
    assert run.info.status == "FINISHED", run.data.tags.get("bnet.error")
    assert run.data.tags["bnet.n_sessions"] == "2" and len(run.data.tags["bnet.session_hashes"].split(",")) == 2
    assert run.data.metrics["session_accuracy_chance"] == 0.5
    assert 0 <= run.data.metrics["val_session_accuracy"] <= 1 and "train_triplet_at_best" in run.data.metrics
    exports = sorted(a.path for a in client.list_artifacts(run.info.run_id, "exports"))
    assert exports == [f"exports/latents.lab_expt_mouse_sess-{k}.hdf5" for k in range(2)]
    latents = []
    for k, name in enumerate(exports):
        path = client.download_artifacts(run.info.run_id, name, str(tmp_path))
        with h5py.File(path) as f:
            assert f.attrs["dataset"] == f"lab/expt/mouse/sess-{k}" and f.attrs["session_index"] == k
            latents.append(f["latents"]["trial_0000"][()])
    assert not (latents[0] == latents[1]).all()  # two sessions' latents, not one file written twice
    # a downstream stage reads one member's latents by the AE's run id
    member = root / "lab/expt/mouse/sess-1/data.hdf5"
    arhmm = tmp_path / "a.yaml"
    arhmm.write_text("model: {n_arhmm_states: 2}\ntraining: {n_iters: 3}\ntuning: {n_trials: 1}\n")
    invoke("tune", "arhmm", "--data", member, "--ae", run.info.run_id, "--ae-experiment", "multi",
           "--config", arhmm, "--store", store, "--experiment", "multi-arhmm")


def test_architectures_from_json_and_the_memory_guard(tmp_path, tiny_session):
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps({"ae_encoding_n_channels": [8, 16], "ae_encoding_kernel_size": [3, 3],
                                "ae_encoding_stride_size": [2, 2], "ae_encoding_layer_type": ["conv", "conv"],
                                "ae_batch_norm": 0, "symmetric_arch": 1}))
    store = tmp_path / "store"
    config = write_config(tmp_path / "j.yaml", {"n_ae_latents": 3, "ae_arch_json": str(arch)})
    invoke("tune", "ae", "--data", tiny_session, "--config", config, "--store", store, "--experiment", "arch")
    _, resolved, (run,) = trial_runs(store, "arch")
    assert load_model(run.info.run_id, resolved).config.conv_channels in ((8, 16), [8, 16])
    searched = write_config(tmp_path / "s.yaml", {"n_ae_latents": 3, "ae_n_conv_layers": [2, 3], "ae_first_channels": 8,
                                                  "ae_kernel_size": [3, 5]}, tuning="n_trials: 2, sampler: grid")
    (tmp_path / "s.yaml").write_text(searched.read_text() + "compute: {mem_limit_gb: 0.000001}\n")
    output = invoke("tune", "ae", "--data", tiny_session, "--config", searched, "--store", store, "--experiment", "guard")
    assert "over mem_limit_gb" in output
    _, _, runs = trial_runs(store, "guard")
    assert runs and all(r.data.tags["bnet.trial_state"] == "PRUNED" for r in runs)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"ae_encoding_n_channels": [8], "ae_encoding_kernel_size": [3],
                               "ae_encoding_stride_size": [2], "ae_network_type": "max_pooling"}))
    config = write_config(tmp_path / "b.yaml", {"ae_arch_json": str(bad)})
    output = invoke("tune", "ae", "--data", tiny_session, "--config", config, "--store", store, "--experiment", "b",
                    code=1)
    assert "bad.json" in output and "ae_network_type" in output


def test_a_study_optimises_a_chosen_metric_or_a_pareto_front(tmp_path, tiny_session):
    store = tmp_path / "store"
    config = write_config(tmp_path / "r.yaml", {"model_class": "ps-vae", "n_ae_latents": 6},
                          tuning="n_trials: 1, metric: val_label_r2")
    output = invoke("tune", "ae", "--data", tiny_session, "--config", config, "--store", store, "--experiment", "r2")
    assert "objective maximize val_label_r2" in output
    config = write_config(tmp_path / "p.yaml", {"model_class": "ps-vae", "n_ae_latents": 6, "ps_vae.alpha": [1, 50]},
                          tuning="n_trials: 2, sampler: grid, metric: [best_val_pixel_mse, best_val_label_mse]")
    output = invoke("tune", "ae", "--data", tiny_session, "--config", config, "--store", store, "--experiment", "mo")
    assert "Pareto front" in output and "pruner none (multi-objective)" in output
    client, _, runs = trial_runs(store, "mo")
    parent = client.search_runs([runs[0].info.experiment_id], "tags.`bnet.role` = 'study'")[0]
    front = json.loads(Path(client.download_artifacts(parent.info.run_id, "pareto_front.json", str(tmp_path))).read_text())
    assert front and all({"best_val_pixel_mse", "best_val_label_mse", "run_id"} <= set(p) for p in front)
    config = write_config(tmp_path / "u.yaml", {"n_ae_latents": 3}, tuning="n_trials: 1, metric: val_label_r2")
    output = invoke("tune", "ae", "--data", tiny_session, "--config", config, "--store", store, "--experiment", "u",
                    code=1)
    assert "not a metric every trial of this study logs" in output


FLIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "sleap_flies"


@pytest.mark.skipif(not FLIES.is_dir(), reason="../shared/data/sleap_flies is absent")
def test_a_ps_vae_reads_the_fly_pose_from_real_video(tmp_path):
    """Fly-centred crops of the real video (the flies are ~2 px long in a 64 px whole frame);
    the PS-VAE's supervised latents predict head, abdomen and wing positions on held-out
    trials (50-frame trials, interleaved splits)."""
    data = tmp_path / "fly.hdf5"
    parts = [f"track0_{p}" for p in ("head", "abdomen", "wingL", "wingR")]
    summary = build_session(BuildConfig(out=data, videos=[FLIES / "20190128_113421.120s.mp4"],
                                        labels=FLIES / "predictions.analysis.h5", keypoints=parts,
                                        centre_on="track0_thorax", window=256, y_pixels=32, x_pixels=32,
                                        trial_length=50, max_frames=1500), echo=lambda line: None)
    assert summary.n_trials == 30
    session = open_session(data, require=("labels", "labels_masks"))
    assert session.n_labels == 8
    centre = session.read("images", 3)[:, 0, 12:20, 12:20].mean()
    assert centre > 3 * session.read("images", 3).mean()  # the fly is in the middle of every frame
    config = tmp_path / "ps.yaml"
    config.write_text(
        "model: {model_class: ps-vae, n_ae_latents: 10, ps_vae.alpha: 1000, ps_vae.beta: 1, ps_vae.anneal_epochs: 5,"
        " ae_n_conv_layers: 3, ae_first_channels: 16, ae_kernel_size: 5, rng_seed_model: 0}\n"
        "data: {trial_splits: '8;1;1;0', rng_seed_data: 0}\n"
        "training: {max_n_epochs: 8, min_n_epochs: 8, batch_size: 16, learning_rate: 1.0e-3}\n"
        "tuning: {n_trials: 1}\n")
    store = tmp_path / "store"
    invoke("tune", "ae", "--data", data, "--config", config, "--store", store, "--experiment", "fly")
    _, _, (run,) = trial_runs(store, "fly")
    assert run.info.status == "FINISHED", run.data.tags.get("bnet.error")
    assert run.data.metrics["val_label_r2"] > 0.4 and run.data.metrics["test_label_r2"] > 0.4, run.data.metrics


# Every class of the family, trained directly (no CLI) in both precisions: bf16 autocast
# must run wherever float32 does (issue 18: msps-vae's per-session layers failed under it).
PRECISION_CLASSES = {**CLASSES, "msps-vae": {"n_background": 2, "n_sessions_per_batch": 2}}
TINY_ARCH = {"conv_channels": (4, 8), "conv_kernels": (5, 5), "conv_strides": (2, 2)}


def test_the_precision_check_covers_every_class_of_the_family():
    assert set(PRECISION_CLASSES) == set(model_classes("ae"))


@pytest.fixture(scope="module")
def two_session_batches(tiny_session):
    """The tiny session's trials as two 'sessions' (4 train and 1 val trials each), with
    labels, in 10-frame batches; msps-vae's train batches mix both sessions."""
    session = open_session(tiny_session)
    signals = ("images", "labels")
    trials = {"train": ([0, 1, 2, 3], [4, 5, 6, 7]), "val": ([8], [9])}

    def batches(name, mix=1):
        return SessionBatches([TrialBatches(session, t, signals, 10) for t in trials[name]], mix)

    return {"train": batches("train"), "mixed": batches("train", 2), "val": batches("val"),
            "n_labels": session.n_labels}


@pytest.mark.parametrize("model_class", sorted(PRECISION_CLASSES))
def test_every_class_trains_alike_in_bf16_and_float32(two_session_batches, model_class):
    """Two epochs from the same weights in each precision, through the per-session layers
    (``fit_sess_io_layers``): finite val losses and pixel MSEs within 1 % of each other,
    float32 weights, and the reported best val loss reproduced by a float32 evaluation."""
    data = two_session_batches
    values = {"model_class": model_class, "model_type": "conv", "y_pixels": 16, "x_pixels": 16, "n_ae_latents": 8,
              "n_labels": data["n_labels"], "n_sessions": 2, "fit_sess_io_layers": True, **TINY_ARCH,
              **PRECISION_CLASSES[model_class]}
    train = data["mixed"] if model_class == "msps-vae" else data["train"]
    losses = {}
    for precision in ("fp32", "bf16"):
        model = build_model(dataclass_from_values(model_entry(model_class).config_type, values))
        torch.manual_seed(0)  # the same posterior samples (variational classes) in both precisions
        result = fit(model, train, data["val"], TrainingConfig(learning_rate=1e-3, max_n_epochs=2,
                                                               enable_early_stop=False), precision=precision)
        assert result.precision == precision
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(math.isfinite(r.train_loss) and math.isfinite(r.val_loss) for r in result.history)
        if model_class == "msps-vae":
            assert all("triplet" in r.train_terms for r in result.history)
        if not model.variational:  # (variational classes sample in evaluation too)
            assert evaluate(model, data["val"]) == pytest.approx(result.best_val_loss, rel=1e-6)
        losses[precision] = [(r.val_loss, r.val_terms["pixel_mse"]) for r in result.history]
    # measured here (emulated bf16): within 0.07 %; the pixel MSE is compared too, since the
    # VAEs' losses carry a constant of 235 (the unit-variance NLL of 256 pixels)
    assert np.allclose(losses["bf16"], losses["fp32"], rtol=0.01, atol=0), losses
