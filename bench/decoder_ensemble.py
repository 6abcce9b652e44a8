"""Decoders and top-N ensembles: held-out R², the N chosen, and training frames/s.

Two problems, each through the real study machinery (a temporary SQLite store):
  * synthetic: neural (Poisson) -> the generator's latents (`neural-labels` on a session whose
    labels are replaced by the true latents), and neural -> true states (accuracy vs chance).
    The noise ceiling is estimated by the same decoder family fitted to 5x more data from
    the same generator (the R² that more data alone would buy).
  * M1: real macaque M1 spikes -> hand velocity, beside the ridge-regression floor computed
    on the same split.

    python bench/decoder_ensemble.py [--trials 4] [--epochs 40]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

import bnet
from bnet.config import load_project_config
from bnet.data import SynthConfig, open_session, read_ground_truth, split_trials, synthesize
from bnet.data.m1 import build_m1_session, lag_window
from bnet.ensemble import build_ensemble
from bnet.tuning.families.arhmm import tune_arhmm
from bnet.tuning.families.decoder import tune_decoder
from machine import describe  # the machine the figures were taken on

SHARED = Path(__file__).resolve().parents[2] / "shared"
CONFIG = """
model:
  model_class: {model_class}
  n_lags: [1, 3]
  n_hid_layers: [0, 1, 2]
  n_hid_units: [64, 128]
  l2_reg: {{low: 1.0e-5, high: 1.0e-2, log: true}}
training:
  learning_rate: {{low: 3.0e-4, high: 3.0e-3, log: true}}
  max_n_epochs: {epochs}
  early_stop_history: 5
tuning: {{n_trials: {trials}, pruner: median, seed: 0}}
"""


def latent_session(path: Path, n_trials: int, seed: int) -> Path:
    """A synthetic session whose labels are the generator's true latents."""
    synthesize(path, SynthConfig(n_trials=n_trials, n_frames=100, y_pixels=8, x_pixels=8, n_neurons=50, seed=seed))
    with h5py.File(path, "a") as f:
        for name in list(f["labels"]):
            del f["labels"][name]
            f["labels"].create_dataset(name, data=f["ground_truth/latents"][name][()].astype(np.float32))
    return path


def study(root: Path, data: Path, name: str, trials: int, epochs: int, target="labels", model_class="neural-labels",
          **refs):
    config_path = root / f"{name}.yaml"
    config_path.write_text(CONFIG.format(model_class=model_class, trials=trials, epochs=epochs))
    store = bnet.resolve_store(root / "store")
    started = time.perf_counter()
    tune_decoder(data=data, target=target, experiment=name, config=load_project_config(config_path),
                 store=store, echo=lambda line: None, **refs)
    seconds = time.perf_counter() - started
    best = bnet.best_runs(name, family="decoder", metric="val_r2" if target != "arhmm" else "val_ll",
                          direction="maximize", store=store)[0]
    return store, best, seconds


def training_frames(name: str, store, metric: str) -> int:
    """Frames the study's trials trained on (train frames x epochs run, over all trials)."""
    runs = bnet.best_runs(name, family="decoder", top=1000, metric=metric, direction="maximize", store=store)
    return sum(int(r.params["n_train_trials"]) * 100 * int(r.metrics["n_epochs"]) for r in runs)


def report(name: str, store, best, metric: str, seconds: float, trials: int):
    frames = training_frames(name, store, metric)
    outcome = build_ensemble(name, max_members=trials, metric=metric, store=store, echo=lambda line: None)
    split_metric = metric.replace("val", "test", 1)
    print(f"{name:<16} best single {split_metric} {outcome.best_single_test:.3f} (val {outcome.best_single_val:.3f})"
          f"   ensemble N={outcome.n_members}: {split_metric} {outcome.test_score:.3f} (val {outcome.val_score:.3f})"
          f"   ~{frames / seconds:,.0f} training frames/s over the study")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=25)
    args = parser.parse_args()
    print(describe(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = latent_session(root / "synthetic.hdf5", 60, seed=0)
        store, best, seconds = study(root, data, "synthetic", args.trials, args.epochs)
        report("synthetic", store, best, "val_r2", seconds, args.trials)
        big = latent_session(root / "ceiling.hdf5", 300, seed=0)
        _, ceiling, _ = study(root, big, "ceiling", 2, args.epochs)
        print(f"{'':<16} noise ceiling estimate (same generator, 5x the trials): test_r2 {ceiling.metrics['test_r2']:.3f}")
        # states: an ARHMM on the true latents (stored as labels), then neural -> its states
        tune_arhmm(data=data, labels=True, experiment="segment", store=store, echo=lambda line: None,
                   config=load_project_config(None), n_trials=1, max_iters=50)
        _, states_best, _ = study(root, data, "states", args.trials, args.epochs, target="arhmm",
                                  model_class="neural-arhmm", arhmm="best", arhmm_experiment="segment")
        session = open_session(data, require=("neural",))
        splits = split_trials(session.trials)
        states = read_ground_truth(data, "states", list(splits.test))
        chance = np.bincount(np.concatenate(states)).max() / sum(len(s) for s in states)
        print(f"{'states':<16} neural-arhmm test_accuracy {states_best.metrics['test_accuracy']:.3f} "
              f"(chance, the most common state: {chance:.3f})")

        m1 = SHARED / "data" / "spykesml_m1_s1" / "m1_stevenson_2011.mat"
        if m1.exists():
            path = build_m1_session(m1, root / "m1.hdf5")
            store, best, seconds = study(root, path, "m1", args.trials, args.epochs)
            session = open_session(path, require=("neural", "labels"))
            splits = split_trials(session.trials)
            report("m1", store, best, "val_r2", seconds, args.trials)
            x = {t: lag_window(session.read("neural", t), 3)[3:-3] for t in session.trials}
            y = {t: session.read("labels", t)[3:-3] for t in session.trials}
            xt, yt = np.concatenate([x[t] for t in splits.train]), np.concatenate([y[t] for t in splits.train])
            xs, ys = np.concatenate([x[t] for t in splits.test]), np.concatenate([y[t] for t in splits.test])
            mx, my = xt.mean(0), yt.mean(0)
            w = np.linalg.solve((xt - mx).T @ (xt - mx) + np.eye(xt.shape[1]), (xt - mx).T @ (yt - my))
            pred = (xs - mx) @ w + my
            floor = 1 - ((pred - ys) ** 2).sum() / ((ys - ys.mean(0)) ** 2).sum()
            print(f"{'':<16} ridge floor (±3 bins, alpha 1) on the same split: test_r2 {floor:.3f}")
        else:
            print(f"M1: skipped ({m1} is absent)")


if __name__ == "__main__":
    main()
