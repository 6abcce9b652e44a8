"""Synthetic sessions with known ground truth.

A low-dimensional latent state follows a switching autoregressive process (sticky Markov
chain over ``n_states`` discrete states, each with its own stable AR(1) dynamics and fixed
point). Pairs of latent dimensions are the (x, y) positions of rendered "body parts"
(Gaussian blobs on a static background), so the labels are those positions in pixels and
the frames are a known smooth function of the latents. Neural activity is a noisy
(Poisson or Gaussian) function of a linear readout of the latents. Everything the
generator drew is stored under ``ground_truth`` so later stages (AE, ARHMM, decoders) can
be scored against it; readers skip that group.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
from scipy.optimize import linear_sum_assignment

from bnet.data.session import trial_name
from bnet.errors import ConfigError


@dataclass(frozen=True)
class SynthConfig:
    """What to generate.

    Attributes:
        n_trials: trials in the session.
        n_frames: frames per trial.
        y_pixels, x_pixels: frame size.
        n_channels: image channels (each channel sees the body parts with its own weights,
            like BehaveNet's two-camera sessions).
        n_neurons: neurons; 0 writes no ``neural`` group.
        n_states: discrete behavioural states of the switching AR process.
        n_latents: latent dimensions (even: two per body part).
        self_transition: probability of staying in a state from one frame to the next.
        latent_noise: standard deviation of the AR innovations.
        neural_noise: ``poisson`` (spike counts) or ``gaussian``.
        neural_noise_std: the standard deviation of ``gaussian`` neural noise around the
            readout (whose own spread is about 1 per neuron): the signal-to-noise knob.
        pixel_noise: standard deviation of pixel noise, in [0, 1] intensity units.
        seed: everything is a deterministic function of the seed and the fields above.
        recording_seed: where set, the seed of the trials alone (paths, pixel and spike
            noise): the animal, rig and neurons stay those of ``seed``, so two files with one
            ``seed`` and two recording seeds are two recordings of one animal (a new session
            for a tuned model); None draws the trials from ``seed`` too.
    """

    n_trials: int = 40
    n_frames: int = 100
    y_pixels: int = 64
    x_pixels: int = 64
    n_channels: int = 1
    n_neurons: int = 50
    n_states: int = 4
    n_latents: int = 4
    self_transition: float = 0.95
    latent_noise: float = 0.04
    neural_noise: str = "poisson"
    neural_noise_std: float = 0.5
    pixel_noise: float = 0.02
    seed: int = 0
    recording_seed: int | None = None

    def validate(self) -> None:
        checks = [
            (self.n_trials >= 1, "n_trials must be at least 1"),
            (self.n_frames >= 2, "n_frames must be at least 2"),
            (self.y_pixels >= 8 and self.x_pixels >= 8, "frames must be at least 8x8 pixels"),
            (self.n_channels >= 1, "n_channels must be at least 1"),
            (self.n_neurons >= 0, "n_neurons must be non-negative"),
            (self.n_states >= 1, "n_states must be at least 1"),
            (self.n_latents >= 2 and self.n_latents % 2 == 0, "n_latents must be even and >= 2"),
            (0 < self.self_transition < 1, "self_transition must lie in (0, 1)"),
            (self.neural_noise in ("poisson", "gaussian"), "neural_noise must be poisson or gaussian"),
            (self.neural_noise_std >= 0, "neural_noise_std must be non-negative"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"synthetic data: {message}")


@dataclass
class SwitchingAR:
    """The generating process of the latents (shared by all trials)."""

    trans_matrix: np.ndarray  # (K, K)
    init_probs: np.ndarray  # (K,)
    As: np.ndarray  # (K, D, D)
    bs: np.ndarray  # (K, D)
    fixed_points: np.ndarray  # (K, D)
    noise_std: float

    def sample(self, n_frames: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        K, D = self.bs.shape
        states = np.empty(n_frames, dtype=np.int64)
        latents = np.empty((n_frames, D))
        states[0] = rng.choice(K, p=self.init_probs)
        latents[0] = self.fixed_points[states[0]] + self.noise_std * rng.standard_normal(D)
        for t in range(1, n_frames):
            states[t] = rng.choice(K, p=self.trans_matrix[states[t - 1]])
            k = states[t]
            latents[t] = self.As[k] @ latents[t - 1] + self.bs[k] + self.noise_std * rng.standard_normal(D)
        return states, latents


def pose_distances(poses: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """Distances (M,) from poses (M, D) to one pose (D,), whichever body part is which.

    Each pose holds D/2 (x, y) body-part positions; parts are matched one to one at least
    cost. Two poses that differ only by which part stands where look nearly alike on
    camera, so states drawn apart by this distance are apart in the frames too.
    """
    parts = poses.reshape(len(poses), -1, 1, 2)
    costs = np.square(parts - pose.reshape(1, 1, -1, 2)).sum(-1)
    return np.sqrt([cost[linear_sum_assignment(cost)].sum() for cost in costs])


def make_process(config: SynthConfig, rng: np.random.Generator) -> SwitchingAR:
    K, D = config.n_states, config.n_latents
    off = (1 - config.self_transition) / max(K - 1, 1)
    trans = np.full((K, K), off) + np.eye(K) * (config.self_transition - off)
    if K == 1:
        trans = np.ones((1, 1))
    # Fixed points spread over the arena so that states are distinct places as well as
    # distinct dynamics (farthest-point sampling from random candidates).
    candidates = rng.uniform(-0.7, 0.7, size=(64 * K, D))
    points = [candidates[0]]
    for _ in range(1, K):
        distance = np.min([pose_distances(candidates, p) for p in points], axis=0)
        points.append(candidates[np.argmax(distance)])
    fixed_points = np.array(points)
    As = np.empty((K, D, D))
    for k in range(K):
        q, _ = np.linalg.qr(rng.standard_normal((D, D)))
        angle = rng.uniform(0.15, 0.5)
        rotation = np.eye(D)
        rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
        As[k] = rng.uniform(0.8, 0.9) * (q @ rotation @ q.T)
    bs = np.einsum("kij,kj->ki", np.eye(D)[None] - As, fixed_points)
    return SwitchingAR(trans, np.full(K, 1.0 / K), As, bs, fixed_points, config.latent_noise)


def render_frames(
    positions: np.ndarray, channel_weights: np.ndarray, background: np.ndarray, blob_sigma: float
) -> np.ndarray:
    """Float frames (T, C, Y, X) in [0, 1] from body-part positions (T, P, 2) in pixels."""
    _, Y, X = background.shape
    gx = np.exp(-((np.arange(X)[None, None] - positions[..., 0:1]) ** 2) / (2 * blob_sigma**2))
    gy = np.exp(-((np.arange(Y)[None, None] - positions[..., 1:2]) ** 2) / (2 * blob_sigma**2))
    blobs = np.einsum("tpy,tpx,cp->tcyx", gy, gx, channel_weights)
    return np.clip(background[None] + blobs, 0.0, 1.0)


def synthesize(path: str | Path, config: SynthConfig = SynthConfig()) -> Path:
    """Write a synthetic session HDF5 file (BehaveNet layout plus ``ground_truth``)."""
    config.validate()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    process = make_process(config, rng)
    C, Y, X, D = config.n_channels, config.y_pixels, config.x_pixels, config.n_latents
    n_parts = D // 2
    scale = np.array([0.35 * X, 0.35 * Y])
    center = np.array([(X - 1) / 2, (Y - 1) / 2])
    channel_weights = rng.uniform(0.5, 0.9, size=(C, n_parts))
    yy, xx = np.mgrid[0:Y, 0:X] / max(X, Y)
    background = np.stack(
        [0.1 + 0.08 * np.sin(2 * np.pi * (xx * (c + 1) + yy)) ** 2 for c in range(C)]
    )
    blob_sigma = 0.08 * min(X, Y)
    readout = rng.standard_normal((config.n_neurons, D)) / np.sqrt(D)
    baseline = rng.uniform(np.log(0.5), np.log(2.0), size=config.n_neurons)

    with h5py.File(path, "w") as f:
        f.attrs.update(
            {"lab": "synthetic", "expt": "bnet-synth", "animal": f"seed{config.seed}",
             "session": path.stem}
        )
        truth = f.create_group("ground_truth")
        truth.attrs.update({k: v for k, v in asdict(config).items() if v is not None})
        params = truth.create_group("params")
        for name, value in [
            ("trans_matrix", process.trans_matrix), ("init_probs", process.init_probs),
            ("As", process.As), ("bs", process.bs), ("fixed_points", process.fixed_points),
            ("neural_readout", readout), ("neural_baseline", baseline),
            ("channel_weights", channel_weights), ("background", background),
        ]:
            params.create_dataset(name, data=value)
        params.attrs.update({"noise_std": process.noise_std, "blob_sigma": blob_sigma})
        groups = {name: f.create_group(name) for name in ("images", "labels")}
        if config.n_neurons:
            groups["neural"] = f.create_group("neural")
        truth_groups = {name: truth.create_group(name) for name in ("states", "latents", "rates")}

        if config.recording_seed is not None:
            rng = np.random.default_rng([config.seed, config.recording_seed])
        for trial in range(config.n_trials):
            states, latents = process.sample(config.n_frames, rng)
            positions = center + scale * latents.reshape(-1, n_parts, 2)
            positions = np.clip(positions, 0, [X - 1, Y - 1])
            frames = render_frames(positions, channel_weights, background, blob_sigma)
            frames += config.pixel_noise * rng.standard_normal(frames.shape)
            name = trial_name(trial)
            groups["images"].create_dataset(
                name, data=np.round(np.clip(frames, 0, 1) * 255).astype(np.uint8)
            )
            groups["labels"].create_dataset(name, data=positions.reshape(-1, 2 * n_parts).astype(np.float32))
            truth_groups["states"].create_dataset(name, data=states)
            truth_groups["latents"].create_dataset(name, data=latents)
            if config.n_neurons:
                drive = latents @ readout.T + baseline
                if config.neural_noise == "poisson":
                    rates = np.exp(drive)
                    neural = rng.poisson(rates)
                else:
                    rates = drive
                    neural = drive + config.neural_noise_std * rng.standard_normal(drive.shape)
                groups["neural"].create_dataset(name, data=neural.astype(np.float32))
                truth_groups["rates"].create_dataset(name, data=rates)

        if config.n_neurons >= 2:
            regions = f.create_group("regions").create_group("indxs")
            halves = np.array_split(np.arange(config.n_neurons), 2)
            for i, idx in enumerate(halves):
                regions.create_dataset(f"region-{i}", data=idx)
    return path


def read_ground_truth(path: str | Path, what: str, trials: list[int] | None = None) -> list[np.ndarray]:
    """Ground-truth ``states``, ``latents`` or ``rates`` per trial of a synthetic session."""
    with h5py.File(path, "r") as f:
        group = f["ground_truth"][what]
        names = [trial_name(t) for t in trials] if trials is not None else sorted(group)
        return [group[name][()] for name in names]
