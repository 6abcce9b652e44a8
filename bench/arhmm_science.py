"""Science check of the segmentation stage on synthetic data with known states.

For each seed: a synthetic session (``bnet data synth``), then
1. an ARHMM fitted to the generator's *true* latents: state accuracy after Hungarian matching;
2. the full pipeline: a conv AE trained on the frames, an ARHMM fitted to its latents: state
   accuracy after Hungarian matching, and how well the latents encode the truth (linear R²);
3. for the first seed, model selection: held-out log-likelihood per step for K = 2 ... 2K_true,
   on the true latents and on the AE latents.
Accuracy is over all frames of the test trials. No MLflow: the pure data/models/training API.
``--precision fp32 bf16`` trains each seed's AE in each precision (same data, same initial
weights, same batch order), so the table compares them seed by seed; the machine (CPU model,
its instruction sets, float32 GEMM rate) is printed first, as bf16's arithmetic depends on it.

    python bench/arhmm_science.py [--seeds 0 1 2] [--n-trials 40] [--n-frames 100] [--pixels 32]
                                  [--ae-epochs 30] [--precision auto|fp32|bf16 ...] [--no-k-sweep]
                                  [--train-seed 0] [--save-latents DIR]
"""

from __future__ import annotations

import argparse
import sys
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
from bnet.training import TrainingConfig, fit, resolve_precision
from bnet.models.serving import encode_session

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402  (the machine the figures were taken on)


def matched_accuracy(true: np.ndarray, found: np.ndarray, n_true: int, n_found: int) -> float:
    """Accuracy after the best one-to-one matching of found states to true states."""
    overlap = np.zeros((n_true, n_found))
    np.add.at(overlap, (true, found), 1)
    rows, cols = linear_sum_assignment(-overlap)
    return overlap[rows, cols].sum() / len(true)


def segment(train, val, n_states):
    model = ARHMM(ARHMMConfig(n_arhmm_states=n_states, n_arhmm_lags=1, transitions="sticky", kappa=100.0,
                              n_iters=100, arhmm_es_tol=1e-7))
    model.fit(train, val_sequences=val)
    return model


class Split:
    """Per-trial values of one session, picked by split."""

    def __init__(self, values: dict[int, np.ndarray], splits):
        self.values, self.splits = values, splits

    def __getitem__(self, name: str) -> list[np.ndarray]:
        return [self.values[t] for t in self.splits[name]]


def state_accuracy(observations: Split, true_states: Split, n_states: int) -> float:
    model = segment(observations["train"], observations["val"], n_states)
    found = np.concatenate([z.numpy() for z in model.viterbi(observations["test"])])
    return matched_accuracy(np.concatenate(true_states["test"]), found, n_states, n_states)


def train_ae(session, splits, pixels: int, n_latents: int, epochs: int, precision: str = "auto",
             train_seed: int = 0) -> tuple[dict[int, np.ndarray], str]:
    batches = {n: TrialBatches(session, splits[n], chunk_size=32) for n in ("train", "val")}
    ae = build_model(AEConfig(y_pixels=pixels, x_pixels=pixels, n_ae_latents=n_latents))
    started = time.perf_counter()

    class Progress:
        def on_epoch_end(self, record):
            print(f"    AE epoch {record.epoch + 1}: train {record.train_loss:.5f} val {record.val_loss:.5f} "
                  f"({record.frames / record.seconds:.0f} frames/s)", flush=True)

    result = fit(ae, batches["train"], batches["val"],
                 TrainingConfig(learning_rate=1e-3, max_n_epochs=epochs, early_stop_history=8,
                                rng_seed_train=train_seed),
                 precision=precision, callbacks=[Progress()])
    summary = (f"{result.precision}, {len(result.history)} epochs in {time.perf_counter() - started:.0f} s, "
               f"best val loss {result.best_val_loss:.5f}")
    return encode_session(ae, session, torch.device("cpu")), summary


def linear_r2(latents: dict[int, np.ndarray], truth: dict[int, np.ndarray]) -> np.ndarray:
    Z = np.concatenate([latents[t] for t in sorted(latents)])
    T = np.concatenate([truth[t] for t in sorted(latents)])
    design = np.c_[Z, np.ones(len(Z))]
    fitted = design @ np.linalg.lstsq(design, T, rcond=None)[0]
    return 1 - ((fitted - T) ** 2).sum(0) / ((T - T.mean(0)) ** 2).sum(0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-trials", type=int, default=40)
    parser.add_argument("--n-frames", type=int, default=100)
    parser.add_argument("--pixels", type=int, default=32)
    parser.add_argument("--n-states", type=int, default=4)
    parser.add_argument("--ae-epochs", type=int, default=30)
    parser.add_argument("--precision", nargs="+", choices=("auto", "fp32", "bf16"), default=["auto"],
                        help="the AE's training precision(s), passed to fit (auto: what bnet picks here)")
    parser.add_argument("--train-seed", type=int, default=0,
                        help="the AE's batch-order seed (another one measures training's own run-to-run spread)")
    parser.add_argument("--no-k-sweep", action="store_true", help="skip the first seed's model selection by K")
    parser.add_argument("--save-latents", type=Path, metavar="DIR",
                        help="write each AE's latents, the true latents and states and the splits to "
                             "DIR/seed{S}-{precision}[-train{T}].npz (per-trial arrays keyed by trial)")
    args = parser.parse_args()
    K = args.n_states
    precisions = list(dict.fromkeys(resolve_precision(p, torch.device("cpu")) for p in args.precision))
    print(describe(), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, seed in enumerate(args.seeds):
            print(f"seed {seed}: {args.n_trials} trials x {args.n_frames} frames of {args.pixels}x{args.pixels}, "
                  f"{K} states", flush=True)
            path = synthesize(Path(tmp) / f"science{seed}.hdf5", SynthConfig(
                n_trials=args.n_trials, n_frames=args.n_frames, y_pixels=args.pixels, x_pixels=args.pixels,
                n_states=K, seed=seed))
            session = open_session(path)
            splits = split_trials(session.trials)
            true_states = Split(dict(zip(session.trials, read_ground_truth(path, "states"))), splits)
            true_latents = Split(dict(zip(session.trials, read_ground_truth(path, "latents"))), splits)
            on_truth = state_accuracy(true_latents, true_states, K)
            print(f"  ARHMM on true latents: state accuracy {on_truth:.3f} (test trials)", flush=True)

            for precision in precisions:
                latents, summary = train_ae(session, splits, args.pixels, 4, args.ae_epochs, precision,
                                            args.train_seed)
                ae_latents = Split(latents, splits)
                r2 = linear_r2(latents, true_latents.values)
                on_ae = state_accuracy(ae_latents, true_states, K)
                print(f"  conv AE: {summary}; R² of true latents from AE latents (linear): "
                      + ", ".join(f"{v:.3f}" for v in r2))
                print(f"  AE latents ({precision}) -> ARHMM: state accuracy {on_ae:.3f} (test trials)", flush=True)
                rows.append((seed, precision, on_truth, on_ae, r2.min(), r2.mean()))
                if args.save_latents:
                    tag = f"-train{args.train_seed}" if args.train_seed else ""
                    args.save_latents.mkdir(parents=True, exist_ok=True)
                    arrays = {f"{name}_{t}": values[t] for name, values in
                              (("ae", latents), ("latents", true_latents.values), ("states", true_states.values))
                              for t in session.trials}
                    np.savez(args.save_latents / f"seed{seed}-{precision}{tag}.npz", accuracy=on_ae,
                             **{f"split_{n}": np.array(splits[n]) for n in ("train", "val", "test")}, **arrays)

                if index == 0 and not args.no_k_sweep:
                    print("  held-out log-likelihood per step and dimension (test trials), by K:")
                    print(f"  {'K':>4}{'true latents':>14}{'AE latents':>12}")
                    for k in range(2, 2 * K + 1):
                        scores = [segment(obs["train"], obs["val"], k).log_likelihood_per_step(obs["test"])
                                  for obs in (true_latents, ae_latents)]
                        print(f"  {k:>4}{scores[0]:>14.4f}{scores[1]:>12.4f}{'  <- generator K' if k == K else ''}",
                              flush=True)

    print(f"\n{'seed':>6}{'AE precision':>14}{'true latents':>14}{'AE -> ARHMM':>13}{'min linear R²':>15}"
          f"{'mean linear R²':>16}")
    for seed, precision, on_truth, on_ae, r2_min, r2_mean in rows:
        print(f"{seed:>6}{precision:>14}{on_truth:>14.3f}{on_ae:>13.3f}{r2_min:>15.3f}{r2_mean:>16.3f}")
    for precision in precisions:
        values = np.array([r[2:] for r in rows if r[1] == precision])
        spread = values.std(0, ddof=1) if len(values) > 1 else np.zeros(values.shape[1])
        print(f"{'mean':>6}{precision:>14}" + "".join(f"{m:>{w}.3f}" for m, w in zip(values.mean(0), (14, 13, 15, 16))))
        print(f"{'sd':>6}{precision:>14}" + "".join(f"{m:>{w}.3f}" for m, w in zip(spread, (14, 13, 15, 16))))


if __name__ == "__main__":
    main()
