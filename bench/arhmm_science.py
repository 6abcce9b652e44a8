"""Science check of the segmentation stage on synthetic data with known states.

1. ARHMM fitted to the generator's *true* latents: state accuracy after Hungarian matching.
2. The full pipeline: a conv AE trained on the frames, an ARHMM fitted to its latents:
   state accuracy after Hungarian matching, and how well the latents encode the truth (R²).
3. Model selection: held-out log-likelihood per step for K = 2 ... 2K_true.
Accuracy is over all frames of the test trials. No MLflow: the pure data/models/training API.

    python bench/arhmm_science.py [--n-trials 40] [--n-frames 100] [--pixels 32] [--ae-epochs 30]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from bnet.data import SynthConfig, TrialBatches, open_session, read_ground_truth, split_trials, synthesize
from bnet.models import build_model
from bnet.models.ae import AEConfig
from bnet.models.arhmm import ARHMM, ARHMMConfig
from bnet.training import TrainingConfig, fit
from bnet.tuning.ae import encode_session


def matched_accuracy(true: np.ndarray, found: np.ndarray, n_true: int, n_found: int) -> float:
    """Accuracy after the best one-to-one matching of found states to true states."""
    overlap = np.zeros((n_true, n_found))
    np.add.at(overlap, (true, found), 1)
    rows, cols = linear_sum_assignment(-overlap)
    return overlap[rows, cols].sum() / len(true)


def segment(train, val, test, n_states, seed=0, n_iters=100):
    model = ARHMM(ARHMMConfig(n_arhmm_states=n_states, n_arhmm_lags=1, transitions="sticky", kappa=100.0,
                              n_iters=n_iters, arhmm_es_tol=1e-7, rng_seed_model=seed))
    model.fit(train, val_sequences=val)
    return model, model.log_likelihood_per_step(test)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-trials", type=int, default=40)
    parser.add_argument("--n-frames", type=int, default=100)
    parser.add_argument("--pixels", type=int, default=32)
    parser.add_argument("--n-states", type=int, default=4)
    parser.add_argument("--ae-epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    K = args.n_states
    with tempfile.TemporaryDirectory() as tmp:
        path = synthesize(Path(tmp) / "science.hdf5", SynthConfig(
            n_trials=args.n_trials, n_frames=args.n_frames, y_pixels=args.pixels, x_pixels=args.pixels,
            n_states=K, seed=args.seed))
        session = open_session(path)
        splits = split_trials(session.trials)
        true_states = dict(zip(session.trials, read_ground_truth(path, "states")))
        true_latents = dict(zip(session.trials, read_ground_truth(path, "latents")))
        pick = lambda values, name: [values[t] for t in splits[name]]  # noqa: E731
        z_test = np.concatenate(pick(true_states, "test"))

        model, _ = segment(pick(true_latents, "train"), pick(true_latents, "val"), pick(true_latents, "test"), K)
        found = np.concatenate([z.numpy() for z in model.viterbi(pick(true_latents, "test"))])
        print(f"ARHMM on true latents: state accuracy {matched_accuracy(z_test, found, K, K):.3f} (test trials)",
              flush=True)

        batches = {n: TrialBatches(session, splits[n], chunk_size=32) for n in ("train", "val")}
        ae = build_model(AEConfig(y_pixels=args.pixels, x_pixels=args.pixels, n_ae_latents=4))
        started = time.perf_counter()
        class Progress:
            def on_epoch_end(self, record):
                print(f"  AE epoch {record.epoch + 1}: train {record.train_loss:.5f} val {record.val_loss:.5f} "
                      f"({record.frames / record.seconds:.0f} frames/s)", flush=True)

        result = fit(ae, batches["train"], batches["val"],
                     TrainingConfig(learning_rate=1e-3, max_n_epochs=args.ae_epochs, early_stop_history=8),
                     callbacks=[Progress()])
        latents = encode_session(ae, session, torch.device("cpu"))
        Z = np.concatenate([latents[t] for t in session.trials])
        T = np.concatenate([true_latents[t] for t in session.trials])
        design = np.c_[Z, np.ones(len(Z))]
        fitted = design @ np.linalg.lstsq(design, T, rcond=None)[0]
        r2 = 1 - ((fitted - T) ** 2).sum(0) / ((T - T.mean(0)) ** 2).sum(0)
        print(f"conv AE: {len(result.history)} epochs in {time.perf_counter() - started:.0f} s, best val loss "
              f"{result.best_val_loss:.5f}; R² of true latents from AE latents (linear): "
              + ", ".join(f"{v:.3f}" for v in r2))
        model, _ = segment(pick(latents, "train"), pick(latents, "val"), pick(latents, "test"), K)
        found = np.concatenate([z.numpy() for z in model.viterbi(pick(latents, "test"))])
        print(f"AE latents -> ARHMM: state accuracy {matched_accuracy(z_test, found, K, K):.3f} (test trials)")

        print("held-out log-likelihood per step and dimension on AE latents, by K:")
        for k in range(2, 2 * K + 1):
            _, score = segment(pick(latents, "train"), pick(latents, "val"), pick(latents, "test"), k)
            print(f"  K={k}: {score:.4f}{'  <- generator K' if k == K else ''}")


if __name__ == "__main__":
    main()
