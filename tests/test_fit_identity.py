"""One identity for a fit, and selections that stay right at the edges (issue 18).

Each test names the defect it guards. Real SQLite MLflow stores and Optuna storages; the
CLI is driven as a user drives it.
"""

import dataclasses
import json
import os
import socket
import subprocess
import sys

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

import bnet
from bnet.config import Range, TuningConfig
from bnet.data import open_session, synthesize
from bnet.tracking import resolve_store
from bnet.tuning import recovery
from bnet.tuning.family import PreparedStudy
from bnet.tuning.space import SearchSpace
from bnet.tuning.study import StudySpec, TrialsKeepFailing, run_study
from conftest import TINY, invoke

pytestmark = pytest.mark.slow


def write(path, text):
    path.write_text(text)
    return path


def trial_runs(store, experiment):
    client = MlflowClient(resolve_store(store).tracking_uri)
    found = client.get_experiment_by_name(experiment)
    return client, client.search_runs([found.experiment_id], "tags.`bnet.role` = 'trial'")


LABEL_DECODER = """
model: {{model_class: {model_class}, n_lags: 0, n_hid_layers: 0, l2_reg: 0.0}}
data: {{rng_seed_data: {seed}{extra}}}
training: {{learning_rate: {lr}, max_n_epochs: 3}}
tuning: {{n_trials: {n}, pruner: none, sampler: grid}}
"""


def decoder_config(tmp_path, name, model_class="neural-labels", seed=0, lr="[1.0e-7, 3.0e-3, 3.0e-2]", n=3,
                   extra=""):
    return write(tmp_path / f"{name}.yaml", LABEL_DECODER.format(model_class=model_class, seed=seed, lr=lr, n=n,
                                                                   extra=extra))


# ------------------------------------------------------------ 2. the direction of a named metric

def test_a_named_metric_ranks_and_registers_in_its_studys_direction(tmp_path, tiny_session):
    """`bnet register decoder --metric val_r2` registered the worst decoder (ascending)."""
    store = tmp_path / "store"
    invoke("tune", "decoder", "--data", tiny_session, "--target", "labels", "--experiment", "dir",
           "--config", decoder_config(tmp_path, "dir"), "--store", store)
    _, runs = trial_runs(store, "dir")
    best = max(runs, key=lambda r: r.data.metrics["val_r2"])
    shown = invoke("best", "decoder", "--experiment", "dir", "--metric", "val_r2", "--top", 3, "--store", store)
    assert shown.startswith(f"1. run {best.info.run_id}  val_r2 ")
    assert f"registered run {best.info.run_id}" in invoke(
        "register", "decoder", "--experiment", "dir", "--name", "dir", "--metric", "val_r2", "--store", store)
    # the held-out counterpart of the optimised metric ranks the same way
    best_test = max(runs, key=lambda r: r.data.metrics["test_r2"])
    assert invoke("best", "decoder", "--experiment", "dir", "--metric", "test_r2", "--store", store).startswith(
        f"1. run {best_test.info.run_id}")
    # a metric no study optimised has no known direction: refused, or ranked as the user says
    refused = invoke("best", "decoder", "--experiment", "dir", "--metric", "n_epochs", "--store", store, code=1)
    assert "say --direction" in refused
    fewest = min(runs, key=lambda r: (r.data.metrics["n_epochs"], r.info.start_time))
    assert invoke("register", "decoder", "--experiment", "dir", "--name", "dir", "--metric", "n_epochs",
                  "--direction", "minimize", "--store", store).count(fewest.info.run_id) == 1


# ----------------------------------------------------------- 3. what an ensemble may average

@pytest.fixture(scope="module")
def gaussian_session(tmp_path_factory):
    """Continuous neural activity: decoders and encoders of labels both maximise val_r2."""
    return synthesize(tmp_path_factory.mktemp("gauss") / "gauss.hdf5", dataclasses.replace(TINY, neural_noise="gaussian"))


def test_an_ensemble_never_mixes_decoders_with_encoders_or_other_splits(tmp_path, gaussian_session):
    store = tmp_path / "store"
    invoke("tune", "decoder", "--data", gaussian_session, "--target", "labels", "--experiment", "mix",
           "--study", "decoders", "--config", decoder_config(tmp_path, "dec", lr="[3.0e-3, 3.0e-2]", n=2),
           "--store", store)
    invoke("tune", "decoder", "--data", gaussian_session, "--target", "labels", "--experiment", "mix",
           "--study", "encoders", "--config", decoder_config(tmp_path, "enc", "labels-neural", lr="[3.0e-3, 3.0e-2]",
                                                              n=2), "--store", store)
    output = invoke("ensemble", "--experiment", "mix", "--max-members", 4, "--store", store, code=1)
    assert "different model classes" in output and "--study" in output
    # the same decoders fitted on other splits: their val and test trials are not these
    invoke("tune", "decoder", "--data", gaussian_session, "--target", "labels", "--experiment", "splits",
           "--study", "seed-0", "--config", decoder_config(tmp_path, "s0", lr="[3.0e-3, 3.0e-2]", n=2),
           "--store", store)
    invoke("tune", "decoder", "--data", gaussian_session, "--target", "labels", "--experiment", "splits",
           "--study", "seed-1", "--config", decoder_config(tmp_path, "s1", seed=1, lr="[3.0e-3, 3.0e-2]", n=2),
           "--store", store)
    output = invoke("ensemble", "--experiment", "splits", "--max-members", 4, "--store", store, code=1)
    assert "different splits (rng_seed_data)" in output
    invoke("ensemble", "--experiment", "splits", "--study", "seed-1", "--max-members", 2, "--store", store)


def test_an_ensemble_by_a_metric_it_cannot_score_is_a_clear_error(tmp_path, tiny_session):
    """`bnet ensemble --metric best_val_loss` hard-coded maximise, then raised a KeyError."""
    store = tmp_path / "store"
    invoke("tune", "decoder", "--data", tiny_session, "--target", "labels", "--experiment", "ens-metric",
           "--config", decoder_config(tmp_path, "m", lr="[3.0e-3, 3.0e-2]", n=2), "--store", store)
    output = invoke("ensemble", "--experiment", "ens-metric", "--metric", "best_val_loss", "--store", store, code=1)
    assert "--metric best_val_loss" in output and "val_r2" in output


# ------------------------------------------- 4.-5. never refitting, and study-scoped answers

def test_another_split_seed_is_another_fit(tmp_path, tiny_session):
    """The config hash left rng_seed_data out for label decoders and label ARHMMs."""
    store = tmp_path / "store"
    for seed in (0, 1):
        output = invoke("tune", "decoder", "--data", tiny_session, "--target", "labels", "--experiment", "seeds",
                        "--study", f"seed-{seed}", "--config", decoder_config(tmp_path, f"s{seed}", seed=seed,
                                                                               lr="3.0e-3", n=1), "--store", store)
        assert "already fitted" not in output
    _, runs = trial_runs(store, "seeds")
    assert sorted(r.data.params["rng_seed_data"] for r in runs) == ["0", "1"]
    assert len({r.data.tags["bnet.config_hash"] for r in runs}) == 2
    for seed in (0, 1):
        config = write(tmp_path / f"hmm{seed}.yaml", f"data: {{rng_seed_data: {seed}}}\n"
                       "model: {n_arhmm_states: 2, n_arhmm_lags: 1, transitions: stationary}\n"
                       "training: {n_iters: 3}\n")
        output = invoke("tune", "arhmm", "--data", tiny_session, "--labels", "--experiment", "hmm-seeds",
                        "--study", f"hmm-seed-{seed}", "--config", config, "--n-trials", 1, "--store", store)
        assert "already fitted" not in output
    _, runs = trial_runs(store, "hmm-seeds")
    assert sorted(r.data.params["rng_seed_data"] for r in runs) == ["0", "1"]


def test_a_reused_fit_is_a_trial_of_the_study_that_reused_it(tmp_path, tiny_session):
    """Study B's best trial was study A's run, and `--study B` then found no runs."""
    store = tmp_path / "store"
    config = decoder_config(tmp_path, "reuse", lr="3.0e-3", n=1)
    for study in ("a", "b"):
        output = invoke("tune", "decoder", "--data", tiny_session, "--target", "labels", "--experiment", "reuse",
                        "--study", study, "--config", config, "--store", store)
    assert "already fitted on this data" in output
    client, runs = trial_runs(store, "reuse")
    fitted = next(r for r in runs if r.data.tags["bnet.study"] == "a")
    linked = next(r for r in runs if r.data.tags["bnet.study"] == "b")
    assert linked.data.tags["bnet.reused_run"] == fitted.info.run_id and linked.info.status == "FINISHED"
    assert linked.data.metrics["val_r2"] == fitted.data.metrics["val_r2"]
    assert linked.data.tags["mlflow.parentRunId"] != fitted.data.tags["mlflow.parentRunId"]
    assert f"1. run {linked.info.run_id}" in invoke("best", "decoder", "--experiment", "reuse", "--study", "b",
                                                    "--store", store)
    assert f"registered run {linked.info.run_id}" in invoke("register", "decoder", "--experiment", "reuse",
                                                            "--study", "b", "--name", "reused", "--store", store)
    model = bnet.load_model("models:/reused@champion", store=resolve_store(store))
    assert model.run.run_id == linked.info.run_id
    invoke("ensemble", "--experiment", "reuse", "--study", "b", "--max-members", 2, "--store", store)
    # across studies the fit is listed once
    assert len(bnet.best_runs("reuse", "decoder", top=5, store=resolve_store(store))) == 1


# ------------------------------------------------------------------------ 6. resuming

def test_resuming_with_another_architecture_or_search_space_is_refused(tmp_path, tiny_session):
    store = tmp_path / "store"
    arch = write(tmp_path / "arch.json", json.dumps({"ae_encoding_n_channels": [4, 8],
                                                     "ae_encoding_kernel_size": [3, 3],
                                                     "ae_encoding_stride_size": [2, 2]}))
    config = write(tmp_path / "ae.yaml", f"model: {{n_ae_latents: [2, 3], ae_arch_json: {arch}}}\n"
                   "training: {learning_rate: 1.0e-3, max_n_epochs: 1, batch_size: 32}\n"
                   "tuning: {n_trials: 1, pruner: none}\n")
    args = ("tune", "ae", "--data", tiny_session, "--experiment", "arch", "--config", config, "--store", store)
    invoke(*args)
    arch.write_text(json.dumps({"ae_encoding_n_channels": [4, 16], "ae_encoding_kernel_size": [3, 3],
                                "ae_encoding_stride_size": [2, 2]}))
    output = invoke(*args, "--n-trials", 2, code=1)
    assert "cannot resume" in output and "conv_channels [4, 8] -> [4, 16]" in output
    arch.write_text(json.dumps({"ae_encoding_n_channels": [4, 8], "ae_encoding_kernel_size": [3, 3],
                                "ae_encoding_stride_size": [2, 2]}))
    write(config, config.read_text().replace("n_ae_latents: [2, 3]", "n_ae_latents: [2, 4]"))
    output = invoke(*args, "--n-trials", 2, code=1)
    assert "the search space differs: n_ae_latents (2, 3) -> (2, 4)" in output
    client, runs = trial_runs(store, "arch")
    parents = client.search_runs([runs[0].info.experiment_id], "tags.`bnet.role` = 'study'")
    assert [p.info.status for p in parents] == ["FINISHED"] and len(runs) == 1


class BrokenResolve:
    """A fitter whose hyperparameters cannot be resolved (raises before any run exists)."""

    def check(self, hparams):
        pass

    def resolve(self, hparams):
        raise ValueError(f"x={hparams['x']:.2f} cannot be resolved")

    def fit(self, context):
        raise AssertionError("never fitted")


def test_an_error_before_the_run_exists_fails_that_trial_clearly(tmp_path, tiny_session):
    from test_study_engine import OBJECTIVE, STUB

    lines = []
    spec = StudySpec("early", STUB, PreparedStudy(open_session(tiny_session), BrokenResolve(), OBJECTIVE),
                     TuningConfig(n_trials=2, pruner="none"), SearchSpace({"x": Range(0.0, 1.0)}), {},
                     resolve_store(tmp_path / "store"))
    with pytest.raises(TrialsKeepFailing, match=r"3 trials in a row failed.*last: trial 2: ValueError: x=.* cannot"):
        run_study(spec, echo=lines.append)
    assert sum("failed before its run was created: ValueError" in line for line in lines) == 3
    client, runs = trial_runs(tmp_path / "store", "early")
    parents = client.search_runs([client.get_experiment_by_name("early").experiment_id], "")
    assert runs == [] and [p.info.status for p in parents] == ["FINISHED"]


# ------------------------------------------------------------- 8. neuron-subset decoders

def test_region_subset_decoders_verify_and_ensemble(tmp_path, tiny_session):
    """subsample_method was no param: members were rebuilt on all neurons (6 vs 3 columns)."""
    import h5py
    import shutil

    session = shutil.copy(tiny_session, tmp_path / "regions.hdf5")
    with h5py.File(session, "a") as f:
        f.create_dataset("regions/areas/left", data=np.arange(0, 4))
        f.create_dataset("regions/areas/right", data=np.arange(4, 10))
    store = tmp_path / "store"
    extra = ", subsample_method: single, subsample_idxs_group_0: areas, subsample_idxs_dataset: left"
    for model_class, experiment in (("neural-labels", "region-dec"), ("labels-neural", "region-enc")):
        invoke("tune", "decoder", "--data", session, "--target", "labels", "--experiment", experiment,
               "--config", decoder_config(tmp_path, experiment, model_class, lr="[3.0e-3, 3.0e-2]", n=2, extra=extra),
               "--store", store)
        _, runs = trial_runs(store, experiment)
        assert {r.data.params["subsample_method"] for r in runs} == {"single"}
        output = invoke("ensemble", "--experiment", experiment, "--max-members", 2, "--store", store)
        client = MlflowClient(resolve_store(store).tracking_uri)
        ensemble = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                                      "tags.`bnet.family` = 'ensemble'")[0]
        assert "top-1" in output
        assert "match" in invoke("ensemble", "verify", ensemble.info.run_id, "--store", store)


# ------------------------------------------------------------ 11. the parent-run lock

def test_a_parent_run_lock_held_by_a_live_worker_is_never_taken(tmp_path):
    storage = resolve_store(tmp_path / "store").optuna_storage
    (tmp_path / "store").mkdir(parents=True, exist_ok=True)
    optuna.create_study(study_name="s#bnet-parent-run", storage=storage).set_user_attr(
        recovery.LOCK_HOLDER_ATTR, recovery.this_worker())
    assert not recovery._lock_is_abandoned("s#bnet-parent-run", storage, waited=10 * recovery.LOCK_WAIT_SECONDS)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = f"{socket.gethostname()}/{gone.pid}/1"
    optuna.load_study(study_name="s#bnet-parent-run", storage=storage).set_user_attr(recovery.LOCK_HOLDER_ATTR, dead)
    assert recovery._lock_is_abandoned("s#bnet-parent-run", storage, waited=0.0)
    elsewhere = "another-host/123/456"
    optuna.load_study(study_name="s#bnet-parent-run", storage=storage).set_user_attr(recovery.LOCK_HOLDER_ATTR,
                                                                                      elsewhere)
    assert not recovery._lock_is_abandoned("s#bnet-parent-run", storage, waited=60.0)
    assert recovery._lock_is_abandoned("s#bnet-parent-run", storage, waited=recovery.LOCK_WAIT_SECONDS + 1)


def test_two_workers_asking_at_once_create_exactly_one_parent_run(tmp_path):
    """Both workers are held at a barrier and enter the parent-run creation together."""
    import threading

    (tmp_path / "store").mkdir(parents=True)
    storage = resolve_store(tmp_path / "store").optuna_storage
    optuna.create_study(study_name="race", storage=storage)
    barrier, created, answers = threading.Barrier(2), [], []

    def create():
        created.append(threading.current_thread().name)
        import time

        time.sleep(0.5)  # the other worker arrives while the run is being created
        return f"run-of-{threading.current_thread().name}"

    def worker():
        study = optuna.load_study(study_name="race", storage=storage)
        barrier.wait()
        answers.append(recovery.parent_run_id(study, study._storage, create))

    threads = [threading.Thread(target=worker, name=f"w{i}") for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(created) == 1 and answers == [f"run-of-{created[0]}"] * 2
    assert optuna.get_all_study_names(storage) == ["race"]  # the lock is released


class FailedBehindItsBack:
    """Fits, but another worker marks the first trial FAIL meanwhile (as Optuna's stale-trial
    check does when a heartbeat lapses)."""

    def __init__(self, storage):
        self.storage = storage

    def check(self, hparams):
        pass

    def resolve(self, hparams):
        return dict(hparams), {"bnet.model_class": "stub"}

    def fit(self, context):
        from bnet.models.decoders import DecoderConfig
        from bnet.tuning.family import TrialResult

        if context.number == 0:
            other = optuna.storages.RDBStorage(self.storage)
            trial = optuna.load_study(study_name="behind", storage=other).trials[0]
            other.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        return TrialResult({"best_val_loss": 0.5}, bnet.build_model(DecoderConfig(model_class="neural-labels")))


def test_a_trial_failed_behind_its_workers_back_ends_cleanly(tmp_path, tiny_session):
    """The worker crashed with "Cannot tell a FAIL trial" (traceback, exit 1, parent RUNNING)."""
    from test_study_engine import OBJECTIVE, STUB

    store = resolve_store(tmp_path / "store")
    (tmp_path / "store").mkdir(parents=True)
    lines = []
    spec = StudySpec("behind", STUB, PreparedStudy(open_session(tiny_session), FailedBehindItsBack(store.optuna_storage),
                                                   OBJECTIVE), TuningConfig(n_trials=1, pruner="none", study="behind"),
                     SearchSpace({"x": Range(0.0, 1.0)}), {}, store)
    outcome = run_study(spec, echo=lines.append)
    assert any("trial 0 was marked FAIL by another worker" in line for line in lines), lines
    assert outcome.n_complete == 1 and outcome.n_failed == 1
    client, runs = trial_runs(tmp_path / "store", "behind")
    assert {r.info.status for r in runs} == {"FINISHED"}
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"


def test_a_worker_leaving_while_another_fits_leaves_the_parent_run_running(tmp_path, tiny_session):
    """Every worker ended the shared parent run as it exited, while others still ran."""
    import signal
    import threading

    from test_study_engine import OBJECTIVE, STUB, StubFitter

    store = resolve_store(tmp_path / "store")
    (tmp_path / "store").mkdir(parents=True)

    def spec(n_trials):
        return StudySpec("leaving", STUB, PreparedStudy(open_session(tiny_session), StubFitter({"best_val_loss": 0.5}),
                                                        OBJECTIVE), TuningConfig(n_trials=n_trials, pruner="none",
                                                                                 study="leaving"),
                         SearchSpace({"x": Range(0.0, 1.0)}), {}, store)

    first = run_study(spec(1), echo=lambda line: None)
    client = MlflowClient(store.tracking_uri)
    assert client.get_run(first.parent_run_id).info.status == "FINISHED"
    # another worker on this host is fitting a trial
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        study = optuna.load_study(study_name="leaving", storage=store.optuna_storage)
        running = study.ask()
        running.set_user_attr(recovery.WORKER_ATTR,
                              f"{socket.gethostname()}/{other.pid}/{recovery._start_ticks(other.pid)}")
        threading.Timer(8.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
        with pytest.raises(KeyboardInterrupt):
            run_study(spec(3), echo=lambda line: None)  # fits one, waits for the other, is stopped
        assert client.get_run(first.parent_run_id).info.status == "RUNNING"
    finally:
        other.kill()
        other.wait()
    # the other worker is gone: its trial is failed and refitted, and the last worker out ends the run
    run_study(spec(3), echo=lambda line: None)
    assert client.get_run(first.parent_run_id).info.status == "FINISHED"


def test_enqueued_points_are_fitted_first_once(tmp_path, tiny_session):
    """Pruning tests (and users) put known settings first through bnet's own study creation."""
    store = tmp_path / "store"
    config = write(tmp_path / "q.yaml", LABEL_DECODER.format(
        model_class="neural-labels", seed=0, lr="{low: 1.0e-4, high: 3.0e-2, log: true}", n=2, extra="")
        .replace("sampler: grid", "sampler: random, enqueue: [{learning_rate: 2.0e-2}, {learning_rate: 1.0e-3}]"))
    args = ("tune", "decoder", "--data", tiny_session, "--target", "labels", "--experiment", "queued",
            "--config", config, "--store", store)
    invoke(*args)
    invoke(*args, "--n-trials", 3)  # resumed: the points are not queued again
    study = optuna.load_study(study_name="queued", storage=resolve_store(store).optuna_storage)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE  # created by bnet for val_r2
    rates = [t.params["learning_rate"] for t in study.trials]
    assert rates[:2] == [2.0e-2, 1.0e-3] and len(rates) == 3 and rates[2] not in rates[:2]
    bad = write(tmp_path / "bad.yaml", config.read_text().replace("{learning_rate: 1.0e-3}", "{n_lags: 2}"))
    output = invoke("tune", "decoder", "--data", tiny_session, "--target", "labels", "--experiment", "bad",
                    "--config", bad, "--store", store, code=1)
    assert "tuning.enqueue names n_lags, which the study does not search (it searches learning_rate)" in output
