"""The one study engine: what every family's study guarantees (issue: selections you can trust).

Real SQLite MLflow stores and Optuna storages throughout; the engine-level tests drive
`run_study` with a small fitter of their own so each guarantee is checked exactly.
"""

import dataclasses
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient

import bnet
from bnet.config import Categorical, Range, TuningConfig, load_project_config
from bnet.data import open_session, synthesize
from bnet.models.decoders import DecoderConfig
from bnet.tracking import resolve_store
from bnet.tuning.family import Family, Objective, PreparedStudy, TrialResult
from bnet.tuning.space import Condition, SearchSpace
from bnet.tuning.samplers import make_pruner
from bnet.tuning.study import StudySpec, run_study
from conftest import TINY, invoke

pytestmark = pytest.mark.slow


def write(path, text):
    path.write_text(text)
    return path


def storage_of(store):
    store.mkdir(parents=True, exist_ok=True)
    return resolve_store(store).optuna_storage


def mlflow_client(store):
    return MlflowClient(resolve_store(store).tracking_uri)


def pruned_only_when_worse_than_median(study: optuna.Study) -> None:
    """Every pruned trial was worse, on the study's own scale, than the median of the other
    trials at the step where it was cut."""
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    for trial in study.trials:
        if trial.state != optuna.trial.TrialState.PRUNED:
            continue
        step = max(trial.intermediate_values)
        value = trial.intermediate_values[step]
        others = sorted(t.intermediate_values[step] for t in study.trials
                        if t.number < trial.number and step in t.intermediate_values)
        median = statistics.median(others)
        assert (value < median) if maximize else (value > median), (trial.number, step, value, others)


# ---------------------------------------------------------------------------- 1. pruning

DECODER_PRUNING = """
experiment: prune-dec
model: {model_class: neural-labels, n_lags: 0, n_hid_layers: 0}
training:
  learning_rate: {low: 1.0e-7, high: 3.0e-2, log: true}
  max_n_epochs: 8
  min_n_epochs: 8
tuning: {n_trials: 3, pruner: median, seed: 0}
"""


def test_maximising_study_prunes_only_the_worse_trial(tmp_path, tiny_session):
    """A decoder study maximises val R²: the pruner must cut the trial that barely learns,
    never the good ones (it fed val loss as if higher were better before)."""
    store = tmp_path / "store"
    config = write(tmp_path / "d.yaml", DECODER_PRUNING.replace(
        "seed: 0}", "seed: 0, enqueue: [{learning_rate: 2.0e-2}, {learning_rate: 1.5e-2}, {learning_rate: 1.0e-7}]}"))
    output = invoke("tune", "decoder", "--data", tiny_session, "--target", "labels", "--config", config,
                    "--store", store)
    study = optuna.load_study(study_name="prune-dec", storage=storage_of(store))
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED"], output
    # the pruner saw the per-epoch val R² (maximised), and it is the series logged as epoch_val_r2
    slow = study.trials[2]
    run = mlflow_client(store).get_run(slow.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["bnet.trial_state"] == "PRUNED"
    logged = {m.step: m.value for m in mlflow_client(store).get_metric_history(run.info.run_id, "epoch_val_r2")}
    assert logged == pytest.approx(slow.intermediate_values)
    good = study.trials[0]
    assert max(good.intermediate_values.values()) == pytest.approx(
        mlflow_client(store).get_run(good.user_attrs["mlflow_run_id"]).data.metrics["val_r2"], abs=0.05)
    pruned_only_when_worse_than_median(study)


AE_PRUNING = """
experiment: prune-ae
model: {n_ae_latents: 2}
training:
  learning_rate: {low: 1.0e-8, high: 0.3, log: true}
  max_n_epochs: 7
  min_n_epochs: 7
  batch_size: 16
tuning: {n_trials: 3, pruner: median, seed: 0}
"""


def test_minimising_study_prunes_only_the_worse_trial(tmp_path, tiny_session):
    """Learning rate 0.3 saturates the decoder's sigmoid (val MSE ~0.29); a fit that does not
    move (1e-8) would not do: it starts at the mean frame, as good as a 7-epoch fit of 16 px
    frames."""
    store = tmp_path / "store"
    config = write(tmp_path / "a.yaml", AE_PRUNING.replace(
        "seed: 0}", "seed: 0, enqueue: [{learning_rate: 3.0e-3}, {learning_rate: 2.0e-3}, {learning_rate: 0.3}]}"))
    invoke("tune", "ae", "--data", tiny_session, "--config", config, "--store", store)
    study = optuna.load_study(study_name="prune-ae", storage=storage_of(store))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    pruned_only_when_worse_than_median(study)


# ------------------------------------------------------------------- 2. failing trials

def test_a_diverging_trial_fails_alone(tmp_path, tiny_session):
    store = tmp_path / "store"
    config = write(tmp_path / "d.yaml", DECODER_PRUNING.replace("pruner: median", "pruner: none")
                   .replace("prune-dec", "diverge").replace(
                       "seed: 0}", "seed: 0, enqueue: [{learning_rate: 1.0e-2}, {learning_rate: 1.0e+30}, "
                                   "{learning_rate: 5.0e-3}]}"))
    output = invoke("tune", "decoder", "--data", tiny_session, "--target", "labels", "--config", config,
                    "--store", store)
    assert "3 complete, 0 pruned, 1 failed" in output and "failed trial 1: FloatingPointError" in output
    study = optuna.load_study(study_name="diverge", storage=storage_of(store))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    client = mlflow_client(store)
    failed = client.get_run(study.trials[1].user_attrs["mlflow_run_id"])
    assert failed.info.status == "FAILED" and failed.data.tags["bnet.trial_state"] == "FAIL"
    assert failed.data.tags["bnet.error"].startswith("FloatingPointError")
    assert "error.txt" in {a.path for a in client.list_artifacts(failed.info.run_id)}
    parent = client.get_run(failed.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_failed"] == 1
    # "best" never picks the failed run
    assert bnet.best_runs("diverge", family="decoder", top=5, store=resolve_store(store))[-1].status == "FINISHED"


class StubFitter:
    """Fits nothing: returns the metrics it is given, reporting a few steps first."""

    def __init__(self, metrics, steps=3, raise_at=None, seconds_per_step=0.0):
        self.metrics, self.steps, self.raise_at, self.seconds = metrics, steps, raise_at, seconds_per_step

    def check(self, hparams):
        pass

    def resolve(self, hparams):
        return dict(hparams), {"bnet.model_class": "stub"}

    def fit(self, context):
        for step in range(self.steps):
            time.sleep(self.seconds)
            if step == self.raise_at:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            context.report(step, {"val_loss": 1.0 / (step + 1)}, self.steps)
        return TrialResult(dict(self.metrics), bnet.build_model(DecoderConfig(model_class="neural-labels")))


STUB = Family("stub", {}, {}, {}, "step", "max_n_epochs", prepare=None, default_model_class=lambda request: "stub")
OBJECTIVE = Objective("best_val_loss", "minimize", "val_loss")


def stub_spec(store, session, fitter, n_trials=2, dims=None, fixed=None, study="stub"):
    space = SearchSpace(dims or {"x": Range(0.0, 1.0)})
    return StudySpec("stub-exp", STUB, PreparedStudy(session, fitter, OBJECTIVE), TuningConfig(
        n_trials=n_trials, pruner="none", study=study), space, fixed or {"rng_seed_model": 0},
        resolve_store(store))


@pytest.mark.parametrize("metrics, reason", [
    ({"best_val_loss": float("nan")}, "the objective best_val_loss is nan"),
    ({"best_val_loss": 0.5, "test_loss": float("nan")}, "metric test_loss is NaN"),
])
def test_a_nan_metric_never_leaves_a_run_finished(tmp_path, tiny_session, metrics, reason):
    session = open_session(tiny_session)
    with pytest.raises(bnet.tuning.study.TrialsKeepFailing, match="3 trials in a row failed"):
        run_study(stub_spec(tmp_path / "store", session, StubFitter(metrics)), echo=lambda line: None)
    client = mlflow_client(tmp_path / "store")
    runs = client.search_runs([client.get_experiment_by_name("stub-exp").experiment_id], "tags.`bnet.role` = 'trial'")
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FAILED"}
    assert all(reason in r.data.tags["bnet.error"] for r in runs)
    study = optuna.load_study(study_name="stub", storage=storage_of(tmp_path / "store"))
    assert {t.state.name for t in study.trials} == {"FAIL"}


def test_system_metrics_are_logged_on_a_trial_that_asks_for_them(tmp_path, tiny_session, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    spec = stub_spec(tmp_path / "store", open_session(tiny_session), StubFitter({"best_val_loss": 0.5},
                                                                              seconds_per_step=0.4), n_trials=1)
    spec.tuning.system_metrics = True
    outcome = run_study(spec, echo=lambda line: None)
    metrics = mlflow_client(tmp_path / "store").get_run(outcome.best_run_id).data.metrics
    assert metrics["system/cpu_utilization_percentage"] >= 0 and metrics["system/system_memory_usage_megabytes"] > 0


def test_a_budgeted_study_retries_the_trial_of_a_worker_that_died_meanwhile(tmp_path, tiny_session):
    """A study bounded by a budget never waits for other workers, so the trial a dead worker
    left RUNNING is failed and queued again between this worker's trials."""
    session = open_session(tiny_session)

    class WorkerDiesBeside(StubFitter):
        def fit(self, context):
            if context.number == 0:  # meanwhile a worker on this host took a trial and died
                study = optuna.load_study(study_name="stub", storage=storage_of(tmp_path / "store"))
                orphan = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})
                orphan.set_user_attr("bnet_worker", f"{socket.gethostname()}/999999999/-")
            return super().fit(context)

    spec = stub_spec(tmp_path / "store", session, WorkerDiesBeside({"best_val_loss": 0.5}), n_trials=None)
    spec.tuning.budget_steps = 9
    lines = []
    run_study(spec, echo=lines.append)
    study = optuna.load_study(study_name="stub", storage=storage_of(tmp_path / "store"))
    orphan, retry = study.trials[1], study.trials[2]
    assert orphan.state.name == "FAIL" and any("trial 1: its worker is gone" in line for line in lines), lines
    assert retry.user_attrs["bnet_retry_of_trial"] == 1 and retry.params == orphan.params
    assert retry.state.name == "COMPLETE"


def test_out_of_memory_in_one_trial_is_that_trial_alone(tmp_path, tiny_session):
    session = open_session(tiny_session)

    class FlakyFitter(StubFitter):
        calls = 0

        def fit(self, context):
            FlakyFitter.calls += 1
            self.raise_at = 1 if FlakyFitter.calls == 2 else None
            return super().fit(context)

    outcome = run_study(stub_spec(tmp_path / "store", session, FlakyFitter({"best_val_loss": 0.5}), n_trials=3),
                        echo=lambda line: None)
    assert (outcome.n_complete, outcome.n_failed) == (3, 1)
    assert outcome.failures == ["trial 1: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"]


def test_every_val_loss_nan_fails_the_fit():
    import torch

    from bnet.training import TrainingConfig, fit

    class NaNOnValidation(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def loss(self, batch):
            return (self.w * batch["x"]).mean() if self.training else torch.tensor(float("nan"))

    batches = [{"x": torch.ones(4, 1)}]
    with pytest.raises(FloatingPointError, match="no epoch had a finite validation loss"):
        fit(NaNOnValidation(), batches, batches, TrainingConfig(max_n_epochs=3))


# --------------------------------------------------------- 3. killed and stopped workers

WORKER_YAML = """
experiment: work
model: {n_ae_latents: 2}
training:
  learning_rate: {low: 1.0e-3, high: 3.0e-3, log: true}
  max_n_epochs: 12
  min_n_epochs: 12
  batch_size: 8
tuning: {n_trials: 2, pruner: none, seed: 0}
"""


def start_worker(tiny_session, config, store):
    command = [sys.executable, "-m", "bnet", "tune", "ae", "--data", str(tiny_session), "--config", str(config),
               "--store", str(store)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def read_until(worker, marker, seen, seconds=300):
    deadline = time.time() + seconds
    for line in worker.stdout:
        seen.append(line)
        if marker in line or time.time() > deadline:
            return
    raise AssertionError("".join(seen))


def test_sigkilled_worker_trial_fails_at_once_on_the_next_invocation(tmp_path, tiny_session):
    store, config = tmp_path / "store", write(tmp_path / "w.yaml", WORKER_YAML)
    worker = start_worker(tiny_session, config, store)
    seen = []
    read_until(worker, "trial 0 ae epoch 2/12", seen)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    study = optuna.load_study(study_name="work", storage=storage_of(store))
    killed_run = study.trials[0].user_attrs["mlflow_run_id"]
    assert study.trials[0].state.name == "RUNNING"
    output = invoke("tune", "ae", "--data", tiny_session, "--config", config, "--store", store)
    # recovered as the study opened (no heartbeat grace period to wait out), then completed
    assert f"(run {killed_run[:8]}): its worker is gone; trial FAIL, run KILLED" in output
    assert output.index("its worker is gone") < output.index("trial 1 (run")
    study = optuna.load_study(study_name="work", storage=storage_of(store))
    assert study.trials[0].state.name == "FAIL"
    assert [t.state.name for t in study.trials[1:]] == ["COMPLETE", "COMPLETE"]
    run = mlflow_client(store).get_run(killed_run)
    assert run.info.status == "KILLED" and run.data.tags["bnet.trial_state"] == "FAIL"
    # the killed trial's hyperparameters were fitted again, the retry linked to the killed run
    retry = study.trials[1]
    assert retry.user_attrs["bnet_retry_of_trial"] == 0 and retry.params == study.trials[0].params
    assert mlflow_client(store).get_run(retry.user_attrs["mlflow_run_id"]).data.tags["bnet.retry_of_run"] == killed_run


def test_sigterm_ends_the_trial_between_epochs_and_the_study_resumes(tmp_path, tiny_session):
    store, config = tmp_path / "store", write(tmp_path / "w.yaml", WORKER_YAML)
    worker = start_worker(tiny_session, config, store)
    seen = []
    read_until(worker, "trial 0 ae epoch 2/12", seen)
    worker.send_signal(signal.SIGTERM)
    seen += worker.stdout.readlines()
    assert worker.wait(timeout=120) == 130, "".join(seen)
    assert any("SIGTERM: stopping" in line for line in seen)
    study = optuna.load_study(study_name="work", storage=storage_of(store))
    trial = study.trials[0]
    assert trial.state.name == "FAIL"
    client = mlflow_client(store)
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and "SIGTERM" in run.data.tags["bnet.error"]
    epochs = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
    assert 2 <= len(epochs) < 12  # it stopped at an epoch's end, not at the end of the fit
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "KILLED"
    invoke("tune", "ae", "--data", tiny_session, "--config", config, "--store", store)
    study = optuna.load_study(study_name="work", storage=storage_of(store))
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE", "COMPLETE"]


# ------------------------------------------------------------- 4. workers starting together

def test_two_workers_started_at_once_on_a_fresh_store_share_one_parent_run(tmp_path, tiny_session):
    store = tmp_path / "store"
    config = write(tmp_path / "d.yaml", DECODER_PRUNING.replace("pruner: median", "pruner: none")
                   .replace("n_trials: 3", "n_trials: 4").replace("prune-dec", "together"))
    command = [sys.executable, "-m", "bnet", "tune", "decoder", "--data", str(tiny_session), "--target", "labels",
               "--config", str(config), "--store", str(store)]
    workers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    client = mlflow_client(store)
    experiment = client.get_experiment_by_name("together")
    parents = client.search_runs([experiment.experiment_id], "tags.`bnet.role` = 'study'")
    assert len(parents) == 1
    trials = client.search_runs([experiment.experiment_id], "tags.`bnet.role` = 'trial'")
    assert all(t.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for t in trials)
    study = optuna.load_study(study_name="together", storage=storage_of(store))
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4 and len({t.user_attrs["mlflow_run_id"] for t in complete}) == len(complete)
    assert optuna.get_all_study_names(storage_of(store)) == ["together"]  # the lock study is gone


# ------------------------------------------------------------------- 5. resuming checks

@pytest.fixture(scope="module")
def other_session(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("other") / "other.hdf5", dataclasses.replace(TINY, seed=4))


def test_resuming_on_other_data_or_other_fixed_values_is_refused(tmp_path, tiny_session, other_session):
    store = tmp_path / "store"
    config = write(tmp_path / "d.yaml", DECODER_PRUNING.replace("prune-dec", "resume")
                   .replace("n_trials: 3", "n_trials: 1"))
    invoke("tune", "decoder", "--data", tiny_session, "--target", "labels", "--config", config, "--store", store)
    output = invoke("tune", "decoder", "--data", other_session, "--target", "labels", "--config", config,
                    "--store", store, "--n-trials", 2, code=1)
    assert "study 'resume' cannot resume with this command: it was started on other data" in output
    output = invoke("tune", "decoder", "--data", tiny_session, "--target", "labels", "--config", config,
                    "--store", store, "--n-trials", 2, "--max-epochs", 3, code=1)
    assert "fixed hyperparameters differ: max_n_epochs 8 -> 3" in output
    assert "1 trial to go" in invoke("tune", "decoder", "--data", tiny_session, "--target", "labels", "--config", config,
                               "--store", store, "--n-trials", 2)


# --------------------------------------------- 6.-8. best, ranking, ensembles, and the data

UPSTREAM_AE = """
model: {n_ae_latents: 2}
training:
  learning_rate: [1.0e-3, 2.0e-3]
  max_n_epochs: 2
  batch_size: 16
tuning: {n_trials: 2, pruner: none, sampler: grid}
"""


@pytest.fixture(scope="module")
def aes(tmp_path_factory, tiny_session, other_session):
    """One AE experiment holding AEs of two session files: two on tiny, one on other."""
    root = tmp_path_factory.mktemp("aes")
    store = root / "store"
    config = write(root / "ae.yaml", UPSTREAM_AE)
    invoke("tune", "ae", "--data", tiny_session, "--experiment", "aes", "--study", "tiny", "--config", config,
           "--store", store)
    invoke("tune", "ae", "--data", other_session, "--experiment", "aes", "--study", "other", "--config", config,
           "--store", store, "--n-trials", 1)
    resolved = resolve_store(store)
    tiny_hash = open_session(tiny_session).data_hash
    return {"store": store, "root": root, "tiny": bnet.best_runs("aes", "ae", 2, store=resolved, data_hash=tiny_hash),
            "other": bnet.best_runs("aes", "ae", 1, store=resolved,
                                    data_hash=open_session(other_session).data_hash)}


def test_best_is_scoped_to_the_data_it_was_fitted_on(aes, tiny_session, other_session):
    store = aes["store"]
    assert len(aes["tiny"]) == 2 and len(aes["other"]) == 1
    shown = invoke("best", "ae", "--experiment", "aes", "--top", 5, "--data", other_session, "--store", store)
    assert aes["other"][0].run_id in shown and not any(r.run_id in shown for r in aes["tiny"])
    # --ae best picks the best AE fitted to *this* file, wherever the experiment's best is
    for data, expected in ((tiny_session, aes["tiny"][0]), (other_session, aes["other"][0])):
        invoke("tune", "arhmm", "--data", data, "--ae-experiment", "aes", "--ae", "best", "--experiment", "seg",
               "--study", f"seg-{expected.run_id[:6]}", "--n-trials", 1, "--max-iters", 3, "--store", store)
        run = bnet.best_runs("seg", "arhmm", study=f"seg-{expected.run_id[:6]}", store=resolve_store(store))[0]
        assert run.tags["bnet.upstream.ae_run_id"] == expected.run_id
    output = invoke("register", "ae", "--experiment", "aes", "--name", "other-ae", "--data", other_session,
                    "--store", store)
    assert f"registered run {aes['other'][0].run_id}" in output


def test_best_and_register_rank_by_what_the_study_optimised(aes, tiny_session):
    """Encoders (AE latents -> spike counts) optimise the Poisson val_ll: they have no val_r2
    to rank by, and ranking by it was wrong even where they had one."""
    store = aes["store"]
    config = write(aes["root"] / "enc.yaml", """
model: {model_class: ae-neural, n_lags: 0, n_hid_layers: 0}
training: {learning_rate: [3.0e-3, 1.0e-2, 3.0e-2], max_n_epochs: 3}
tuning: {n_trials: 3, pruner: none}
""")
    invoke("tune", "decoder", "--data", tiny_session, "--target", "ae", "--ae", aes["tiny"][0].run_id,
           "--experiment", "enc", "--config", config, "--store", store)
    resolved = resolve_store(store)
    runs = bnet.best_runs("enc", "decoder", 3, store=resolved)
    values = [r.metrics["val_ll"] for r in runs]
    assert values == sorted(values, reverse=True) and runs[0].tags["bnet.objective"] == "val_ll"
    shown = invoke("best", "decoder", "--experiment", "enc", "--store", store)
    assert shown.startswith(f"1. run {runs[0].run_id}  val_ll ")
    assert f"registered run {runs[0].run_id}" in invoke("register", "decoder", "--experiment", "enc",
                                                        "--name", "enc", "--store", store)


def test_ensemble_refuses_members_built_on_different_upstream_runs(aes, tiny_session):
    store = aes["store"]
    config = write(aes["root"] / "dec.yaml", """
model: {model_class: neural-ae, n_lags: 0, n_hid_layers: 0}
training: {learning_rate: [3.0e-3, 1.0e-2], max_n_epochs: 3}
tuning: {n_trials: 2, pruner: none, sampler: grid}
""")
    for i, ae_run in enumerate(aes["tiny"]):
        invoke("tune", "decoder", "--data", tiny_session, "--target", "ae", "--ae", ae_run.run_id,
               "--experiment", "mixed", "--study", f"on-ae-{i}", "--config", config, "--store", store)
    output = invoke("ensemble", "--experiment", "mixed", "--max-members", 4, "--store", store, code=1)
    assert "different upstream ae runs" in output and "--study" in output
    invoke("ensemble", "--experiment", "mixed", "--study", "on-ae-1", "--max-members", 2, "--store", store)


def test_decoder_splits_come_from_the_upstream_run(aes, tiny_session):
    config = write(aes["root"] / "splits.yaml", "data: {trial_splits: '6;2;2;0'}\nmodel: {n_lags: 0}\n")
    output = invoke("tune", "decoder", "--data", tiny_session, "--target", "ae", "--ae", aes["tiny"][0].run_id,
                    "--experiment", "x", "--config", config, "--store", aes["store"], code=1)
    assert "the splits come from ae run" in output and "trial_splits 6;2;2;0 (the run's 8;1;1;0)" in output


@pytest.mark.parametrize("noise, expected", [("gaussian", "gaussian"), ("categorical", None)])
def test_a_users_noise_dist_is_used_or_refused(aes, tiny_session, noise, expected):
    config = write(aes["root"] / f"noise-{noise}.yaml",
                   f"model: {{model_class: ae-neural, n_lags: 0, noise_dist: {noise}}}\n"
                   "training: {learning_rate: [1.0e-3, 2.0e-3], max_n_epochs: 2}\n")
    args = ("tune", "decoder", "--data", tiny_session, "--target", "ae", "--ae", aes["tiny"][0].run_id,
            "--experiment", f"noise-{noise}", "--config", config, "--n-trials", 1, "--store", aes["store"])
    if expected is None:
        assert "noise_dist 'categorical' does not suit counts targets" in invoke(*args, code=1)
        return
    # Gaussian means of counts may be negative, no Poisson rates: such a study maximises R²
    assert "objective maximize val_r2" in invoke(*args)
    run = bnet.best_runs(f"noise-{noise}", "decoder", store=resolve_store(aes["store"]))[0]
    assert run.params["noise_dist"] == expected


# ---------------------------------------------------- 9. default spaces and no refitting

def test_zero_config_ae_study_searches_the_default_space(tmp_path, tiny_session):
    output = invoke("tune", "ae", "--data", tiny_session, "--experiment", "zero", "--n-trials", 2,
                    "--max-epochs", 2, "--pruner", "none", "--store", tmp_path / "store")
    assert "the ae default space is searched: n_ae_latents (8, 16, 32), learning_rate" in output
    runs = bnet.best_runs("zero", "ae", 2, store=resolve_store(tmp_path / "store"))
    assert len({(r.params["n_ae_latents"], r.params["learning_rate"]) for r in runs}) == 2
    assert {r.params["early_stop_history"] for r in runs} == {"10"}  # the family's budget


def test_the_pruners_scale_with_a_trials_budget():
    median = make_pruner(TuningConfig(pruner="median"), 60)
    assert median._n_warmup_steps == 12 and median._n_startup_trials == 2
    assert make_pruner(TuningConfig(pruner="median"), 10)._n_warmup_steps == 5
    assert make_pruner(TuningConfig(pruner="median"))._n_warmup_steps == 5  # a searched budget
    assert make_pruner(TuningConfig(pruner="hyperband"), 60)._max_resource == 60


def test_a_configuration_finished_on_the_same_data_is_never_refitted(tmp_path, tiny_session):
    store = tmp_path / "store"
    config = write(tmp_path / "two.yaml", """
model: {model_class: neural-labels, n_lags: 0, n_hid_layers: [0, 1], n_hid_units: 8}
training: {learning_rate: 1.0e-2, max_n_epochs: 2}
tuning: {n_trials: 4, pruner: none, sampler: random, seed: 0}
""")
    output = invoke("tune", "decoder", "--data", tiny_session, "--target", "labels", "--experiment", "same",
                    "--config", config, "--store", store)
    client = mlflow_client(store)
    experiment_id = client.get_experiment_by_name("same").experiment_id
    fits = client.search_runs([experiment_id], "tags.`bnet.role` = 'trial'")
    assert len(fits) == 2 and "already fitted on this data" in output
    study = optuna.load_study(study_name="same", storage=storage_of(store))
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 4
    # a second study of the same experiment reuses them too; another seed is a new fit
    output = invoke("tune", "decoder", "--data", tiny_session, "--target", "labels", "--experiment", "same",
                    "--study", "again", "--config", config, "--n-trials", 1, "--store", store)
    assert "already fitted on this data" in output
    seeded = write(tmp_path / "seeds.yaml", config.read_text().replace("n_hid_units: 8", "n_hid_units: 8, "
                                                                      "rng_seed_model: [5, 6]"))
    invoke("tune", "decoder", "--data", tiny_session, "--target", "labels", "--experiment", "same",
           "--study", "seeds", "--config", seeded, "--n-trials", 2, "--sampler", "grid", "--store", store)
    assert len(client.search_runs([experiment_id], "tags.`bnet.role` = 'trial'")) > 2


def test_a_study_that_searches_nothing_fits_once(tmp_path, tiny_session):
    config = write(tmp_path / "fixed.yaml", "model: {model_class: neural-labels, n_lags: 0, n_hid_layers: 0, "
                   "l2_reg: 0.0}\ntraining: {learning_rate: 1.0e-2, max_n_epochs: 2}\n")
    output = invoke("tune", "decoder", "--data", tiny_session, "--target", "labels", "--experiment", "fixed",
                    "--config", config, "--n-trials", 3, "--store", tmp_path / "store")
    assert "nothing is searched" in output and "1 complete" in output


# --------------------------------------------------------------- 10. conditional dimensions

def test_conditional_dimensions_are_asked_only_where_they_matter():
    space = SearchSpace({"transitions": Categorical(("stationary", "sticky")), "kappa": Range(1.0, 10.0, log=True)},
                        {"kappa": Condition("transitions", lambda v: v == "sticky", 0.0, "sticky")})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        chosen = space.suggest(trial)
        values = space.resolve(chosen, {})
        assert ("kappa" in trial.params) == (chosen["transitions"] == "sticky")
        assert (values["kappa"] > 0) == (chosen["transitions"] == "sticky")
        seen.add(chosen["transitions"])
        study.tell(trial, 0.0)
    assert seen == {"stationary", "sticky"}


# ---------------------------------------------------------------------- 12. smaller things

def test_an_arhmm_fitted_on_cuda_loads_on_a_cpu_machine(tmp_path):
    import numpy as np
    import torch

    from bnet.models.arhmm.registered import SegmentationConfig
    from bnet.models.checkpoint import load_checkpoint, save_checkpoint

    model = bnet.build_model(SegmentationConfig(n_arhmm_states=2, n_arhmm_lags=1, dtype="float32"))
    rng = np.random.default_rng(0)
    model.engine.initialize([rng.normal(size=(30, 2)) for _ in range(3)])
    path = save_checkpoint(tmp_path / "model.pt", model)
    content = torch.load(path, weights_only=True)
    content["model_config"]["device"] = "cuda"  # as a GPU worker writes it
    torch.save(content, path)
    loaded = load_checkpoint(path)
    assert loaded.config.device == "cpu"
    x = [rng.normal(size=(20, 2))]
    assert math.isfinite(loaded.engine.log_likelihood(x))


def test_experiment_names_cannot_write_outside_the_store(tmp_path, tiny_session):
    store = tmp_path / "deep" / "store"
    invoke("tune", "decoder", "--data", tiny_session, "--target", "labels", "--experiment", "../escaped",
           "--n-trials", 1, "--max-epochs", 1, "--store", store)
    outside = [p for p in (tmp_path / "deep").iterdir() if p.name != "store"]
    assert outside == []
    assert (store / "artifacts" / "escaped").is_dir()


def test_a_locked_sqlite_store_is_waited_for_not_failed(tmp_path, tiny_session):
    import sqlite3
    import threading

    from bnet.tracking.tracker import Tracker

    resolved = resolve_store(tmp_path / "store")
    tracker = Tracker(resolved)
    run = tracker.create_run(tracker.experiment("locked"), "r", {})
    holder = sqlite3.connect(str(resolved.root / "mlflow.db"), isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")  # another worker's long write
    release = threading.Timer(7.0, lambda: holder.execute("COMMIT"))
    release.start()
    started = time.time()
    run.log_metrics({"val_loss": 0.5}, step=0)  # MLflow's own busy wait is 5 s
    assert time.time() - started > 5
    release.join()
    assert tracker.client.get_run(run.run_id).data.metrics["val_loss"] == 0.5


def test_ui_stopped_with_sigterm_ends_its_server_and_workers(tmp_path):
    import socket

    from bnet.tracking.local_postgres import free_port, wait_for_port

    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "bnet", "ui", "--store", str(tmp_path / "store"),
                           "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait_for_port(port, 90):
        ui.kill()
        raise AssertionError(ui.stdout.read())
    def pgrep(*args):
        return subprocess.run(["pgrep", *args], capture_output=True, text=True).stdout.split()

    server = pgrep("-P", str(ui.pid))  # mlflow server, leading a process group of its own
    group = pgrep("-g", server[0])
    assert len(server) == 1 and len(group) >= 2, group  # the server and its uvicorn worker
    ui.send_signal(signal.SIGTERM)
    assert ui.wait(timeout=60) == 0
    time.sleep(1)
    assert pgrep("-g", server[0]) == [] and pgrep("-f", f"port {port}") == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_typed_config_values_are_clear_errors(tmp_path, tiny_session):
    for text, message in (("tuning: {n_trials: '5'}", "'n_trials' must be an integer or null, got '5'"),
                          ("training: {learning_rate: fast}", "'learning_rate' must be a number, got 'fast'"),
                          ("model: {n_ae_latents: [2, three]}", "'n_ae_latents' must be an integer, got 'three'")):
        config = write(tmp_path / "bad.yaml", text)
        output = invoke("tune", "ae", "--data", tiny_session, "--experiment", "typed", "--config", config,
                        "--store", tmp_path / "store", code=1)
        assert message in output and "Traceback" not in output
    assert load_project_config(write(tmp_path / "e.yaml", "training: {learning_rate: 1e-4}")).values[
        "learning_rate"] == 1e-4
