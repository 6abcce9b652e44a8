import math
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.stats
import torch

from bnet.data import open_session
from bnet.data.m1 import build_m1_session, lag_window, load_m1_recording, ridge_floor
from bnet.errors import ConfigError, DataError
from bnet.models import (
    build_model,
    config_from_dict,
    load_checkpoint,
    model_classes,
    read_checkpoint,
    save_checkpoint,
)
from bnet.models.decoder_metrics import (
    accuracy,
    categorical_log_likelihood,
    poisson_log_likelihood,
    r2_score,
    score_trials,
    trim_lags,
)
from bnet.models.decoders import MODEL_CLASSES, DecoderConfig, motion_energy
from bnet.training.loop import TrainingConfig, evaluate, fit

M1_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "spykesml_m1_s1"
M1_MAT = M1_DIR / "m1_stevenson_2011.mat"
needs_m1 = pytest.mark.skipif(not M1_MAT.exists(), reason=f"real M1 recording not found at {M1_MAT}")

NOISE_CLASSES = {
    "gaussian": "neural-ae", "gaussian-full": "neural-ae", "categorical": "neural-arhmm", "poisson": "ae-neural",
}


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def decoder(noise_dist: str = "gaussian", **overrides):
    values = {
        "model_class": NOISE_CLASSES[noise_dist],
        "model_type": "mlp-mv" if noise_dist == "gaussian-full" else "mlp",
        "noise_dist": noise_dist, "n_input": 5, "n_output": 3, "n_lags": 2, "n_hid_layers": 1, "n_hid_units": 8,
        "activation": "tanh",
    }
    values.update(overrides)
    return build_model(DecoderConfig(**values))


def random_targets(noise_dist: str, n_frames: int, n_output: int = 3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if noise_dist == "categorical":
        return torch.randint(0, n_output, (n_frames,), generator=generator)
    if noise_dist == "poisson":
        return torch.poisson(torch.full((n_frames, n_output), 2.0), generator=generator)
    return torch.randn(n_frames, n_output, generator=generator)


def train(model, batch: dict[str, torch.Tensor], steps: int = 300, lr: float = 0.05) -> tuple[float, float]:
    """Full-batch Adam; returns the loss before and after."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    with torch.no_grad():
        before = float(model.loss(batch))
    for _ in range(steps):
        optimizer.zero_grad()
        model.loss(batch).backward()
        optimizer.step()
    with torch.no_grad():
        return before, float(model.loss(batch))


def linear_problem(n_frames: int = 600, n_input: int = 6, n_output: int = 3, seed: int = 0):
    """Inputs and a linear drive that uses the current and the previous frame."""
    rng = np.random.default_rng(seed)
    inputs = rng.standard_normal((n_frames, n_input))
    now, previous = rng.standard_normal((2, n_input, n_output)) / np.sqrt(n_input)
    drive = inputs @ now
    drive[1:] += inputs[:-1] @ previous
    return torch.tensor(inputs, dtype=torch.float32), drive, rng


# ---------------------------------------------------------------- architecture


def test_every_decoder_class_is_registered_in_the_decoder_family():
    assert model_classes("decoder") == sorted(MODEL_CLASSES)
    for model_class in MODEL_CLASSES:
        config = DecoderConfig(model_class=model_class, n_input=4, n_output=3)
        assert type(build_model(config)).__name__ == "Decoder"


@pytest.mark.parametrize(
    "n_hid_layers, n_lags, n_params",
    [
        (0, 0, 5 * 3 + 3),
        (0, 2, 5 * 3 * 5 + 3),
        (2, 0, (5 * 8 + 8) + (8 * 8 + 8) + (8 * 3 + 3)),
        (2, 2, (5 * 8 * 5 + 8) + (8 * 8 + 8) + (8 * 3 + 3)),
    ],
)
def test_parameter_counts_and_output_shapes(n_hid_layers, n_lags, n_params):
    model = decoder(n_hid_layers=n_hid_layers, n_lags=n_lags)
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert len(model.linears) == n_hid_layers
    with torch.no_grad():
        assert model(torch.randn(17, 5)).shape == (17, 3)
        assert model(torch.randn(4, 17, 5)).shape == (4, 17, 3)


def test_full_covariance_adds_one_precision_factor():
    mv = decoder("gaussian-full", n_hid_layers=0, n_lags=0)
    assert sum(p.numel() for p in mv.parameters()) == 5 * 3 + 3 + 3 * 3
    assert torch.allclose(mv.covariance(), torch.eye(3))  # initialised at unit covariance


@pytest.mark.parametrize("n_hid_layers", [0, 2])
@pytest.mark.parametrize("n_lags", [0, 1, 3])
def test_output_at_t_sees_exactly_inputs_t_minus_to_t_plus_n_lags(n_hid_layers, n_lags):
    model = decoder(n_hid_layers=n_hid_layers, n_lags=n_lags)
    inputs = torch.randn(25, 5)
    perturbed = inputs.clone()
    perturbed[10] += 1.0
    with torch.no_grad():
        changed = (model(perturbed) - model(inputs)).abs().amax(dim=1) > 0
    assert changed.nonzero().flatten().tolist() == list(range(10 - n_lags, 10 + n_lags + 1))


def test_output_nonlinearity_follows_the_noise():
    inputs = torch.randn(30, 5)
    rates = decoder("poisson").predict(inputs)
    assert bool((rates > 0).all())
    probs = decoder("categorical").predict(inputs)
    assert torch.allclose(probs.sum(dim=1), torch.ones(30)) and bool((probs > 0).all())
    gaussian = decoder("gaussian")
    assert torch.equal(gaussian.predict(inputs), gaussian(inputs).detach())


def test_seeded_initialisation_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    a = decoder(rng_seed_model=7)
    assert torch.equal(torch.rand(3), expected_draw)
    b, c = decoder(rng_seed_model=7), decoder(rng_seed_model=8)
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name])
    assert not torch.equal(a.conv.weight, c.conv.weight)


# ---------------------------------------------------------------- config


def test_config_defaults_follow_behavenet():
    assert DecoderConfig(model_class="neural-arhmm").noise_dist == "categorical"
    assert DecoderConfig(model_class="ae-neural").noise_dist == "poisson"
    assert DecoderConfig(model_type="mlp-mv").noise_dist == "gaussian-full"
    assert DecoderConfig(n_lags=6).n_max_lags == 6
    config = DecoderConfig(model_class="neural-labels", n_lags=2, n_max_lags=5)
    assert config_from_dict(asdict(config)) == config
    assert DecoderConfig().n_lags == 4 and DecoderConfig(model_type="lstm").n_lags == 0
    assert DecoderConfig(model_class="labels-neural").noise_dist == "poisson"


def test_inputs_are_standardised_by_the_training_statistics_the_checkpoint_keeps(tmp_path):
    model = build_model(DecoderConfig(n_input=2, n_output=1, n_lags=0, n_hid_layers=0))
    inputs = torch.tensor([[0.01, 5.0], [0.03, 5.0], [0.05, 5.0]])
    model.set_input_statistics(inputs)
    assert torch.allclose(model.input_mean, torch.tensor([0.03, 5.0]))
    assert torch.allclose(model.input_scale, torch.tensor([0.02, 1.0]))  # a constant input is centred only
    standardised = torch.stack([torch.tensor([-1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0])])
    assert torch.allclose(model(inputs), model.conv(standardised.T).T, atol=1e-6)
    path = save_checkpoint(tmp_path / "model.pt", model)
    assert torch.allclose(load_checkpoint(path)(inputs), model(inputs))
    # a checkpoint from before the statistics existed loads as raw inputs
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("input_")}
    fresh = build_model(model.config)
    fresh.load_state_dict(old)
    assert torch.equal(fresh.input_mean, torch.zeros(2)) and torch.equal(fresh.input_scale, torch.ones(2))


@pytest.mark.parametrize("bidirectional", [True, False])
def test_an_lstm_reads_the_whole_trial_and_the_future_only_when_bidirectional(bidirectional):
    model = build_model(DecoderConfig(model_type="lstm", n_input=3, n_output=2, n_hid_layers=2, n_hid_units=8,
                                      bidirectional=bidirectional))
    inputs = torch.randn(40, 3)
    edited = inputs.clone()
    edited[30] += 1.0  # far outside any MLP window of the default lags
    before, after = model(inputs), model(edited)
    assert before.shape == (40, 2)
    assert not torch.allclose(before[31:], after[31:])  # the past reaches every later frame
    assert torch.allclose(before[:30], after[:30]) != bidirectional  # the future only reaches back both ways
    batched = model(torch.stack([inputs, edited]))
    assert torch.allclose(batched[0], before, atol=1e-6) and torch.allclose(batched[1], after, atol=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model_class": "neural-images"}, "model_class 'neural-images'"),
        ({"model_type": "lstm", "n_lags": 2}, "the LSTM reads the whole trial"),
        ({"model_type": "lstm", "n_hid_layers": 0}, "n_hid_layers (LSTM layers) must be at least 1"),
        ({"model_type": "mlp-mv", "noise_dist": "gaussian"}, "mlp-mv"),
        ({"model_type": "mlp", "noise_dist": "gaussian-full"}, "mlp-mv"),
        ({"model_class": "neural-arhmm", "noise_dist": "gaussian"}, "categorical"),
        ({"model_class": "neural-ae", "noise_dist": "categorical"}, "categorical"),
        ({"model_class": "neural-arhmm", "n_output": 1}, "n_output must be at least 2"),
        ({"n_lags": 4, "n_max_lags": 2}, "n_max_lags (2) must be at least n_lags (4)"),
        ({"activation": "gelu"}, "activation 'gelu'"),
        ({"l2_reg": -1.0}, "l2_reg"),
    ],
)
def test_bad_configs_are_errors_that_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_model(DecoderConfig(**{"n_input": 3, "n_output": 2, **overrides}))


# ---------------------------------------------------------------- loss


@pytest.mark.parametrize("noise_dist", list(NOISE_CLASSES))
def test_loss_ignores_the_first_and_last_n_max_lags_frames(noise_dist):
    model = decoder(noise_dist, n_lags=1, n_max_lags=3)
    inputs, targets = torch.randn(20, 5), random_targets(noise_dist, 20)
    edited = targets.clone()
    edited[:3] = edited[:3].flip(0) + 1
    edited[-3:] = edited[-3:].flip(0) + 1
    with torch.no_grad():
        loss = model.loss({"inputs": inputs, "targets": targets})
        assert torch.equal(model.loss({"inputs": inputs, "targets": edited}), loss)
        edited[3] = (edited[3] + 1) % 3 if noise_dist == "categorical" else edited[3] + 1
        assert not torch.equal(model.loss({"inputs": inputs, "targets": edited}), loss)


def test_loss_needs_frames_left_after_dropping_lags():
    model = decoder(n_lags=2, n_max_lags=4)
    with pytest.raises(ConfigError, match="n_max_lags=4"):
        model.loss({"inputs": torch.randn(8, 5), "targets": torch.randn(8, 3)})


def test_losses_are_the_negative_log_likelihoods_the_metrics_compute():
    inputs = torch.randn(30, 5)
    scored = slice(2, 28)

    states = random_targets("categorical", 30)
    categorical = decoder("categorical")
    with torch.no_grad():
        loss = float(categorical.loss({"inputs": inputs, "targets": states}))
    probs = categorical.predict(inputs).numpy()[scored]
    assert loss == pytest.approx(-categorical_log_likelihood(states.numpy()[scored], probs), rel=1e-5)

    counts = random_targets("poisson", 30)
    poisson = decoder("poisson")
    with torch.no_grad():
        loss = float(poisson.loss({"inputs": inputs, "targets": counts}))
    rates = poisson.predict(inputs).numpy()[scored]
    assert loss == pytest.approx(-poisson_log_likelihood(counts.numpy()[scored], rates), rel=1e-5)

    values = random_targets("gaussian-full", 30)
    full = decoder("gaussian-full")
    with torch.no_grad():
        full.precision_factor.copy_(torch.tensor([[0.3, 0.0, 0.0], [0.5, -0.2, 0.0], [-0.4, 0.1, 0.1]]))
        loss = float(full.loss({"inputs": inputs, "targets": values}))
    means, covariance = full.predict(inputs).numpy()[scored], full.covariance().numpy()
    log_pdf = [scipy.stats.multivariate_normal(m, covariance).logpdf(v) for m, v in zip(means, values.numpy()[scored])]
    assert loss == pytest.approx(-np.mean(log_pdf), rel=1e-5)


# ---------------------------------------------------------------- learning


def test_gaussian_decoder_learns_a_lagged_linear_map():
    inputs, drive, rng = linear_problem()
    targets = torch.tensor(drive + 0.1 * rng.standard_normal(drive.shape), dtype=torch.float32)
    model = decoder("gaussian", n_input=6, n_hid_layers=0, n_lags=1)
    before, after = train(model, {"inputs": inputs[:400], "targets": targets[:400]})
    assert after < 0.1 * before
    held_out = slice(401, 599)  # away from the train/test seam and the padded end
    r2, _ = r2_score(drive[held_out], model.predict(inputs).numpy()[held_out])
    assert r2 > 0.9


def test_full_covariance_decoder_recovers_the_noise_covariance():
    inputs, drive, rng = linear_problem(n_frames=2000, n_output=2)
    true_covariance = np.array([[0.25, 0.2], [0.2, 0.25]])
    noise = rng.multivariate_normal(np.zeros(2), true_covariance, size=len(drive))
    targets = torch.tensor(drive + noise, dtype=torch.float32)
    model = decoder("gaussian-full", n_input=6, n_output=2, n_hid_layers=0, n_lags=1)
    before, after = train(model, {"inputs": inputs, "targets": targets}, steps=400)
    assert after < before - 1.0
    assert np.allclose(model.covariance().numpy(), true_covariance, atol=0.03)


def test_categorical_decoder_beats_chance_on_held_out_frames():
    inputs, drive, _ = linear_problem()
    states = torch.tensor(np.argmax(3 * drive, axis=1))
    model = decoder("categorical", n_input=6, n_hid_layers=0, n_lags=1)
    before, after = train(model, {"inputs": inputs[:400], "targets": states[:400]})
    assert after < 0.5 * before
    held_out = slice(401, 599)
    assert accuracy(states.numpy()[held_out], model.predict(inputs).numpy()[held_out]) > 0.8  # chance: 1/3


def test_poisson_decoder_learns_rates():
    inputs, drive, rng = linear_problem()
    true_rates = np.exp(0.5 * drive + 0.5)
    counts = torch.tensor(rng.poisson(true_rates), dtype=torch.float32)
    model = decoder("poisson", n_input=6, n_hid_layers=0, n_lags=1)
    before, after = train(model, {"inputs": inputs[:400], "targets": counts[:400]})
    assert after < 0.7 * before
    held_out = slice(401, 599)
    held_out_counts = counts.numpy()[held_out]
    fitted = poisson_log_likelihood(held_out_counts, model.predict(inputs).numpy()[held_out])
    mean_rate = np.broadcast_to(counts[:400].mean(0).numpy(), held_out_counts.shape)
    constant = poisson_log_likelihood(held_out_counts, mean_rate)
    truth = poisson_log_likelihood(held_out_counts, true_rates[held_out])
    # softplus rates cannot match exp rates exactly, but get most of the way from a constant
    assert fitted > constant + 0.5 and fitted > truth - 0.2


def test_training_loop_fits_a_decoder_on_trial_batches():
    inputs, drive, rng = linear_problem()
    targets = torch.tensor(drive + 0.1 * rng.standard_normal(drive.shape), dtype=torch.float32)
    batches = [{"inputs": inputs[i : i + 100], "targets": targets[i : i + 100]} for i in range(0, 600, 100)]
    model = decoder("gaussian", n_input=6, n_hid_layers=0, n_lags=1)
    initial_val = evaluate(model, batches[5:])
    result = fit(model, batches[:5], batches[5:], TrainingConfig(learning_rate=0.05, max_n_epochs=40), precision="fp32")
    assert result.best_val_loss < 0.1 * initial_val
    assert evaluate(model, batches[5:]) == pytest.approx(result.best_val_loss)


def test_checkpoint_round_trip(tmp_path):
    model = decoder("gaussian-full", n_hid_layers=2, rng_seed_model=3)
    with torch.no_grad():
        model.precision_factor.add_(torch.tril(torch.full((3, 3), 0.3)))
    path = save_checkpoint(tmp_path / "model.pt", model, metadata={"run": "x"})
    assert read_checkpoint(path)["family"] == "decoder"
    loaded = load_checkpoint(path)
    assert loaded.config == model.config
    inputs = torch.randn(12, 5)
    assert torch.equal(loaded.predict(inputs), model.predict(inputs))
    assert torch.equal(loaded.covariance(), model.covariance())


# ---------------------------------------------------------------- metrics


def test_r2_score_variance_weighted_and_per_dimension():
    true = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 3.0]])
    pred = np.array([[1.0, 0.0], [2.0, 1.0], [4.0, 3.0]])
    r2, per_dim = r2_score(true, pred)
    # x: SSE 1, SST 2; y: SSE 1, SST 6; pooled: 1 - 2/8
    assert np.allclose(per_dim, [0.5, 5 / 6]) and r2 == pytest.approx(0.75)
    # a dimension constant over the frames (a silent neuron) has no R² of its own
    r2, per_dim = r2_score(np.c_[true, np.ones(3)], np.c_[pred, np.zeros(3)])
    assert np.isnan(per_dim[2]) and np.allclose(per_dim[:2], [0.5, 5 / 6]) and r2 == pytest.approx(1 - 5 / 8)


def test_accuracy_and_categorical_log_likelihood():
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.5, 0.4], [0.3, 0.4, 0.3]])
    assert accuracy(np.array([0, 1, 2, 1]), probs) == 0.75
    two = np.array([[0.5, 0.5], [0.75, 0.25]])
    assert categorical_log_likelihood(np.array([0, 1]), two) == pytest.approx(-1.5 * math.log(2))


def test_poisson_log_likelihood():
    # log p(0 | 1) = -1; log p(2 | 2) = 2 log 2 - 2 - log 2!
    assert poisson_log_likelihood(np.array([[0, 2]]), np.array([[1.0, 2.0]])) == pytest.approx((math.log(2) - 3) / 2)
    assert poisson_log_likelihood(np.array([0]), np.array([0.0])) == 0.0


def test_scoring_drops_n_max_lags_frames_at_both_ends_of_each_trial():
    true = [np.arange(5.0)[:, None], np.arange(4.0)[:, None]]
    pred = [t.copy() for t in true]
    for trial in pred:
        trial[[0, -1]] += 10  # wrong only at the edges
    assert score_trials(r2_score, true, pred, n_max_lags=1)[0] == 1.0
    assert score_trials(r2_score, true, pred, n_max_lags=0)[0] < 0
    assert [len(t) for t in trim_lags(true, 1)] == [3, 2]
    with pytest.raises(ValueError, match="no frames left"):
        trim_lags(true, 3)


def test_motion_energy_is_absolute_frame_difference_with_zero_first_frame():
    latents = np.array([[1.0, 2.0], [4.0, 0.0], [4.0, 1.0]])
    assert np.array_equal(motion_energy(latents), [[0.0, 0.0], [3.0, 2.0], [0.0, 1.0]])


# ---------------------------------------------------------------- M1 session


def test_lag_window_stacks_neighbouring_frames_with_zero_padding():
    x = np.arange(1.0, 5.0)[:, None]
    assert np.array_equal(lag_window(x, 1), [[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 0]])


def test_m1_builder_errors_name_the_file_and_key(tmp_path):
    missing = tmp_path / "absent.mat"
    with pytest.raises(DataError, match="absent.mat: no such file"):
        build_m1_session(missing, tmp_path / "out.hdf5")
    partial = tmp_path / "partial.mat"
    scipy.io.savemat(partial, {"spikes": np.zeros((3, 50), dtype=np.uint8)})
    with pytest.raises(DataError, match="partial.mat: no variable 'handVel'"):
        build_m1_session(partial, tmp_path / "out.hdf5")
    not_mat = tmp_path / "text.mat"
    not_mat.write_text("not a MATLAB file")
    with pytest.raises(DataError, match="text.mat: cannot be read"):
        build_m1_session(not_mat, tmp_path / "out.hdf5")


@pytest.fixture(scope="module")
def m1_recording():
    return load_m1_recording(M1_MAT)


@needs_m1
def test_m1_session_has_155_pseudo_trials_of_spikes_and_velocity(tmp_path, m1_recording):
    path = build_m1_session(M1_MAT, tmp_path / "m1.hdf5")
    session = open_session(path, require=("neural", "labels"))
    assert session.n_trials == 155 == 15536 // 100
    assert set(session.n_frames) == {100}
    assert (session.n_neurons, session.n_labels) == (171, 2)
    assert session.dataset_id == "miller/stevenson-2011/macaque/m1"
    spikes, velocity = m1_recording
    assert np.array_equal(session.read("neural", 3), spikes[300:400])
    assert np.array_equal(session.read("labels", 154), velocity[15400:15500])


@needs_m1
def test_ridge_floor_reproduces_the_readme(m1_recording):
    r2_x, r2_y = ridge_floor(*m1_recording, lags=3, train_fraction=0.8)
    assert abs(r2_x - 0.79) <= 0.03 and abs(r2_y - 0.68) <= 0.03
