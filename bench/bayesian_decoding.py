"""Bayesian decoding (bnet.models.bayesian_decoding) against the direct decoder it starts from,
on synthetic sessions whose latents and neural noise are known.

Per noise level and seed: a synthetic session (60 trials of 100 frames, 4 latents, 4 states,
30 neurons with Gaussian noise of the given standard deviation around a readout whose own
spread is about 1), an ARHMM (4 states, 1 lag) fitted to the training trials' true latents, a
ridge decoder of the latents and a logistic decoder of the ARHMM's states from the neural
activity (+-2 frames), then the Bayesian decoder with its scale c chosen on the validation
trials. Prints test latent R^2 of both, the gain, c, the clamped fraction and the state
accuracy (argmax of the state decoder vs the Viterbi path), after the machine's description.

    python bench/bayesian_decoding.py [--noise 0.5 2 3] [--seeds 0 1 2] [--samples 8] [--method gibbs] [--json]

``--json`` prints one JSON object per setting instead of the table (the acceptance tests in
tests/test_bayesian_decoding.py read them).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402  (the machine the figures were taken on)

from bnet.data import SynthConfig, open_session, read_ground_truth, split_trials, synthesize  # noqa: E402
from bnet.models.arhmm import ARHMM, ARHMMConfig  # noqa: E402
from bnet.models.bayesian_decoding import METHODS, ARHMMPrior  # noqa: E402
from bnet.models.decoder_metrics import r2_score  # noqa: E402

SCALES = (1, 3, 10, 30, 100, 1e3, 1e4, 1e6)
WINDOW = 2  # frames of neural activity either side


def windows(neural: np.ndarray) -> np.ndarray:
    """(T, N) -> (T, N * (2 WINDOW + 1) + 1): each frame's neighbours side by side, then a 1."""
    n_frames = len(neural)
    padded = np.pad(neural, ((WINDOW, WINDOW), (0, 0)))
    return np.concatenate([padded[i : i + n_frames] for i in range(2 * WINDOW + 1)] + [np.ones((n_frames, 1))], 1)


def r2(truth: list[np.ndarray], estimate: list[np.ndarray]) -> float:
    return float(r2_score(np.concatenate(truth), np.concatenate(estimate))[0])


def one_setting(folder: Path, noise: float, seed: int, n_samples: int, method: str = "sample") -> dict[str, float]:
    config = SynthConfig(n_trials=60, n_frames=100, y_pixels=16, x_pixels=16, n_neurons=30, n_states=4, n_latents=4,
                         neural_noise="gaussian", neural_noise_std=noise, seed=seed)
    path = synthesize(folder / f"noise{noise}_seed{seed}.hdf5", config)
    session = open_session(path)
    latents, neural = read_ground_truth(path, "latents"), session.read_all("neural")
    splits = split_trials(session.trials, "8;1;1;0", 0)
    train, val, test = list(splits.train), list(splits.val), list(splits.test)
    arhmm = ARHMM(ARHMMConfig(n_arhmm_states=4, n_arhmm_lags=1, n_iters=50))
    arhmm.fit([latents[t] for t in train])
    states = [z.numpy() for z in arhmm.viterbi(latents)]

    features = [windows(x) for x in neural]
    design = np.concatenate([features[t] for t in train])
    weights = np.linalg.solve(design.T @ design + np.eye(design.shape[1]), design.T @ np.concatenate(
        [latents[t] for t in train]))
    direct = [f @ weights for f in features]
    # as bnet tune bayesian-decoder: the mean squared validation error (the decoder's bias counts)
    error_var = (np.concatenate([latents[t] - direct[t] for t in val]) ** 2).mean(0)

    classifier = torch.nn.Linear(design.shape[1], 4, bias=False).double()
    optimizer = torch.optim.LBFGS(classifier.parameters(), max_iter=200, line_search_fn="strong_wolfe")
    targets = torch.from_numpy(np.concatenate([states[t] for t in train]))

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(classifier(torch.from_numpy(design)), targets)
        loss = loss + 1e-3 * classifier.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        probs = [torch.softmax(classifier(torch.from_numpy(f)), -1) for f in features]

    train_latents = np.concatenate([latents[t] for t in train])
    prior = ARHMMPrior.from_engine(arhmm, torch.from_numpy(train_latents.mean(0)),
                                   torch.from_numpy(np.cov(train_latents.T)))

    def posterior(trials, scale):
        return METHODS[method](prior, torch.from_numpy(np.stack([direct[t] for t in trials])),
                               torch.from_numpy(error_var), torch.stack([probs[t] for t in trials]), scale, n_samples,
                               torch.Generator().manual_seed(0))

    started = time.perf_counter()
    val_r2, scale = max((r2([latents[t] for t in val], list(posterior(val, c).mean.numpy())), c) for c in SCALES)
    result = posterior(test, scale)
    seconds = time.perf_counter() - started
    direct_states = np.concatenate([probs[t].argmax(-1).numpy() for t in test])
    true_states = np.concatenate([states[t] for t in test])
    return {"direct": r2([latents[t] for t in test], [direct[t] for t in test]),
            "bayes": r2([latents[t] for t in test], list(result.mean.numpy())), "scale": scale,
            "clamped": float(result.clamped_fraction.mean()), "direct_states": float((direct_states == true_states).mean()),
            "viterbi_states": float((result.viterbi.numpy().ravel() == true_states).mean()), "seconds": seconds,
            "clamped_at_1": float(posterior(test, 1.0).clamped_fraction.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.5, 2.0, 3.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="One JSON object per setting, no table.")
    parser.add_argument("--method", choices=sorted(METHODS), default="sample",
                        help="sample: sampled state paths, then the smoother (default); gibbs: the Gibbs sampler.")
    args = parser.parse_args()
    if args.json:
        with tempfile.TemporaryDirectory() as tmp:
            for noise in args.noise:
                for seed in args.seeds:
                    print(json.dumps({"noise": noise, "seed": seed, **one_setting(Path(tmp), noise, seed,
                                                                                 args.samples, args.method)}),
                          flush=True)
        return
    print(describe(), flush=True)
    print("| neural noise | seed | direct test R² | Bayesian test R² | gain | c | clamped (c=1) | state accuracy: "
          "decoder / Viterbi | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for noise in args.noise:
            for seed in args.seeds:
                r = one_setting(Path(tmp), noise, seed, args.samples, args.method)
                print(f"| {noise:g} | {seed} | {r['direct']:.3f} | {r['bayes']:.3f} | {r['bayes'] - r['direct']:+.3f} | "
                      f"{r['scale']:g} | {r['clamped']:.2f} ({r['clamped_at_1']:.2f}) | "
                      f"{r['direct_states']:.3f} / {r['viterbi_states']:.3f} | {r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
