"""`bnet plot reconstruction|decoder|syllables|traversal` from runs of a real store."""

import imageio_ffmpeg
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import bnet
from bnet.tracking import resolve_store
from conftest import assert_clean_failure, invoke, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_session):
    """AE (registered) -> ARHMM and AE -> decoder of its latents, on the tiny session."""
    root = tmp_path_factory.mktemp("movies")
    store = root / "store"
    (root / "ae.yaml").write_text("experiment: ae\nmodel: {model_type: conv, n_ae_latents: 3}\n"
                                  "training: {max_n_epochs: 2, batch_size: 20}\ntuning: {n_trials: 1}\n")
    (root / "arhmm.yaml").write_text("experiment: seg\nmodel: {n_arhmm_states: 2}\ntraining: {n_iters: 3}\n"
                                     "tuning: {n_trials: 1}\n")
    (root / "dec.yaml").write_text("experiment: dec\nmodel: {n_lags: 1, n_hid_layers: 0}\n"
                                   "training: {max_n_epochs: 3}\ntuning: {n_trials: 1}\n")
    invoke("tune", "ae", "--data", tiny_session, "--config", root / "ae.yaml", "--store", store)
    invoke("register", "ae", "--experiment", "ae", "--name", "movie-ae", "--store", store)
    invoke("tune", "arhmm", "--data", tiny_session, "--ae-experiment", "ae", "--config", root / "arhmm.yaml",
           "--store", store)
    invoke("tune", "decoder", "--data", tiny_session, "--target", "ae", "--ae-experiment", "ae",
           "--config", root / "dec.yaml", "--store", store)
    resolved = resolve_store(store)
    return {"store": store, "resolved": resolved, "root": root,
            **{family: bnet.best_runs(experiment, family, store=resolved)[0]
               for family, experiment in (("ae", "ae"), ("arhmm", "seg"), ("decoder", "dec"))}}


def frames_of(path):
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader]
    return meta, frames


@pytest.mark.parametrize("kind, reference, expected_frames, fragment", [
    ("reconstruction", "models:/movie-ae@champion", 2 * 20, "original | reconstruction | residual"),
    ("decoder", "decoder", 1 * 20, "original | AE reconstruction | decoded from neural"),
    ("traversal", "ae", 60, "latent traversals of ae run"),
    ("syllables", "arhmm", None, "2 states of ARHMM run"),
    ("samples", "arhmm", 20, "20 frames of real vs ARHMM-sampled latents"),
])
def test_movies_are_written_and_logged_on_their_run(runs, tmp_path, kind, reference, expected_frames, fragment):
    ref = reference if reference.startswith("models:/") else runs[reference].run_id
    out = tmp_path / f"{kind}.mp4"
    output = invoke("plot", kind, ref, "--out", out, "--log", "--store", runs["store"])
    assert fragment in output and f"logged as movies/{kind}.mp4" in output
    meta, frames = frames_of(out)
    if expected_frames is not None:  # held-out trials are 20 frames each (1 test trial of 12)
        assert len(frames) == expected_frames or kind == "reconstruction" and len(frames) == 20
    assert np.std(frames[len(frames) // 2]) > 5  # pictures, not a blank canvas
    run_id = runs["ae"].run_id if reference.startswith("models:/") else runs[reference].run_id
    logged = {a.path for a in MlflowClient(runs["resolved"].tracking_uri).list_artifacts(run_id, "movies")}
    assert f"movies/{kind}.mp4" in logged


def test_movies_refuse_the_wrong_kind_of_run(runs, tmp_path):
    result = run_cli("plot", "decoder", runs["ae"].run_id, "--out", str(tmp_path / "x.mp4"),
                     "--store", str(runs["store"]))
    assert_clean_failure(result, "a ae run, not decoder")
    result = run_cli("plot", "reconstruction", runs["ae"].run_id, "--out",
                     str(tmp_path / "x.avi"), "--store", str(runs["store"]))
    assert_clean_failure(result, "movies are .mp4 (ffmpeg) or .gif")


def test_a_study_report_and_the_parent_runs_summary(runs, tmp_path):
    client = MlflowClient(runs["resolved"].tracking_uri)
    parent_id = client.get_run(runs["ae"].run_id).data.tags["mlflow.parentRunId"]
    assert "plots/study_summary.png" in {a.path for a in client.list_artifacts(parent_id, "plots")}
    parent = client.get_run(parent_id)
    assert parent.data.tags["bnet.best_run_id"] == runs["ae"].run_id and "best_val_loss" in parent.data.metrics
    # what the runs table shows without expanding the study: its answer and its data
    assert parent.info.run_name == "study ae"  # stable: the moving answer is a tag and the description
    assert parent.data.tags["bnet.best"].startswith("best_val_loss ") and "(trial 0)" in parent.data.tags["bnet.best"]
    assert [d.dataset.name for d in parent.inputs.dataset_inputs] == ["synthetic/bnet-synth/seed3/tiny"]
    assert "Best: trial 0" in parent.data.tags["mlflow.note.content"]
    out = tmp_path / "report.html"
    output = invoke("report", "ae", "--out", out, "--store", runs["store"])
    assert f"logged as report/report.html of parent run {parent_id}" in output
    page = out.read_text()
    assert "<h1>Study ae</h1>" in page and runs["ae"].run_id in page
    for title in ("study summary", "optimisation history", "best run: training curves", "best run: reconstructions"):
        assert f"alt='{title}'" in page, title
    assert "report/report.html" in {a.path for a in client.list_artifacts(parent_id, "report")}
    png = tmp_path / "summary.png"
    invoke("report", "ae", "--out", png, "--no-log", "--store", runs["store"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = run_cli("report", "nope", "--store", str(runs["store"]))
    assert_clean_failure(result, "no study 'nope'", "has ae")


def test_the_dashboard_serves_the_stores_studies(runs):
    import json
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "bnet", "dashboard", "--store", str(runs["store"]),
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, studies = time.monotonic() + 60, None
        while time.monotonic() < deadline and studies is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as response:
                    studies = json.loads(response.read())
            except OSError:
                time.sleep(0.5)
        assert studies is not None, "the dashboard never answered"
        names = {s["study_name"] for s in studies["study_summaries"]}
        assert {"ae", "seg", "dec"} <= names
    finally:
        server.terminate()
        server.wait(timeout=10)
