"""The batched ARHMM engine: agreement with ssm's reference results, and reference-free checks
(brute-force enumeration of state paths, EM monotonicity, float32, batching, checkpoints,
errors)."""

from __future__ import annotations

import dataclasses
import functools
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp, softmax

from bnet.models.arhmm import (
    ARHMM,
    NOISE_TYPES,
    TRANSITIONS,
    ARHMMConfig,
    ARHMMConfigError,
    ARHMMDataError,
    ARHMMParameters,
)
from bnet.models.arhmm import messages
from bnet.models.arhmm.batch import lagged_design

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference" / "arhmm"
REFERENCE_CASES = [
    "arhmm_ar_stationary_lags1", "arhmm_ar_sticky_lags1",
    "arhmm_diagonal_ar_stationary_lags1", "arhmm_diagonal_ar_sticky_lags1",
    "arhmm_robust_ar_stationary_lags1", "arhmm_robust_ar_sticky_lags1",
    "arhmm_diagonal_robust_ar_stationary_lags1", "arhmm_diagonal_robust_ar_sticky_lags1",
    "arhmm_ar_recurrent_lags1", "arhmm_ar_recurrent_only_lags1",
    "arhmm_ar_stationary_lags2", "arhmm_ar_sticky_lags2",
]
RECURRENT_CASES = {case for case in REFERENCE_CASES if "recurrent" in case}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, dtype=float), np.asarray(expected, dtype=float)
    return float(np.max(np.abs(actual - expected) / np.abs(expected)))


def absolute_error(actual, expected) -> float:
    return float(np.max(np.abs(np.asarray(actual, dtype=float) - np.asarray(expected, dtype=float))))


# ---------------------------------------------------------------- ssm references

@functools.cache
def reference(case: str) -> dict:
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"the ssm reference results are not available: {REFERENCE_DIR} does not exist")
    with np.load(REFERENCE_DIR / f"{case}.npz", allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def reference_config(ref: dict) -> ARHMMConfig:
    transitions = str(ref["transitions"])
    return ARHMMConfig(dtype="float64", n_arhmm_states=int(ref["K"]), n_arhmm_lags=int(ref["lags"]),
                       noise_type=str(ref["noise_type"]), transitions=transitions,
                       kappa=float(ref["kappa"]) if transitions == "sticky" else 0.0,
                       alpha=float(ref["alpha"]))


def reference_sequences(ref: dict, split: str) -> list[np.ndarray]:
    return [ref[f"{split}_x"][n, :length] for n, length in enumerate(ref[f"{split}_lengths"])]


def assert_parameters_match(model: ARHMM, ref: dict, tag: str, names: tuple[str, ...], tol: float) -> None:
    """Compare what ssm evaluates with (normalised pi0 and transition matrix, Sigmas)."""
    p = model.parameters
    comparable = {"As": p.As, "bs": p.bs, "Sigmas": p.Sigmas, "nus": p.nus,
                  "pi0": torch.softmax(p.log_pi0, -1),
                  "trans_matrix": None if p.log_Ps is None else torch.softmax(p.log_Ps, -1)}
    for name in names:
        if f"{tag}_{name}" in ref and comparable[name] is not None:
            error = absolute_error(comparable[name], ref[f"{tag}_{name}"])
            assert error <= tol, f"{tag}_{name} differs from ssm by {error:.2e}"


@functools.cache
def em_from_init(case: str):
    """20 EM iterations from ssm's init_ parameters; the parameters after iteration 1 too."""
    ref = reference(case)
    model = ARHMM.from_ssm(reference_config(ref), ref, prefix="init_")
    after_one = {}

    def keep_first_iteration(iteration, train_ll, val_ll):
        if iteration == 1:
            after_one.update(model.state_dict())

    history = model.fit(reference_sequences(ref, "train"), n_iters=int(ref["num_iters"]),
                        tol=0.0, callback=keep_first_iteration)
    return model, ARHMM.from_state_dict(model.config, after_one), history


@pytest.mark.parametrize("tag", ["init", "fit"])
@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_reference_inference_at_fixed_parameters(case, tag):
    ref = reference(case)
    model = ARHMM.from_ssm(reference_config(ref), ref, prefix=f"{tag}_")
    train, test = reference_sequences(ref, "train"), reference_sequences(ref, "test")
    train_ll = model.log_likelihood(train, per_sequence=True)
    assert relative_error(train_ll.sum(), ref[f"ll_train_{tag}"]) <= 1e-10
    assert relative_error(model.log_likelihood(test), ref[f"ll_test_{tag}"]) <= 1e-10
    assert relative_error(train_ll, ref[f"ll_train_seq_{tag}"]) <= 1e-10
    assert relative_error(model.log_likelihood(test, per_sequence=True), ref[f"ll_test_seq_{tag}"]) <= 1e-10

    test0 = test[:1]
    assert absolute_error(model.emission_log_likelihoods(test0)[0], ref[f"test0_log_likes_{tag}"]) <= 1e-9
    assert absolute_error(model.log_transition_matrices(test0)[0], ref[f"test0_log_trans_{tag}"]) <= 1e-9
    posterior = model.expected_states(test0)
    assert absolute_error(posterior.expected_states[0], ref[f"test0_Ez_{tag}"]) <= 1e-8
    assert absolute_error(posterior.expected_joints, ref[f"test0_Ezzp1_sum_{tag}"]) <= 1e-8
    np.testing.assert_array_equal(model.viterbi(test0)[0].numpy(), ref[f"test0_viterbi_{tag}"])
    assert abs(model.log_prior() - float(ref[f"log_prior_{tag}"])) <= 1e-9


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_reference_log_likelihood_after_one_iteration(case):
    ref = reference(case)
    model = ARHMM.from_ssm(reference_config(ref), ref, prefix="em1_")
    train_ll = model.log_likelihood(reference_sequences(ref, "train"))
    assert relative_error(train_ll, ref["ll_train_em1"]) <= 1e-10


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_reference_em_one_iteration(case):
    ref = reference(case)
    _, after_one, history = em_from_init(case)
    # The observation and initial-state M-steps only use the exact E-step, so they match ssm
    # tightly even where the transition M-step is an optimiser run.
    assert_parameters_match(after_one, ref, "em1", ("As", "bs", "Sigmas", "nus", "pi0"), 1e-8)
    assert relative_error(history.train_log_likelihoods[1], ref["ll_train_em1"]) <= (
        1e-3 if case in RECURRENT_CASES else 1e-9)
    if case not in RECURRENT_CASES:
        assert_parameters_match(after_one, ref, "em1", ("trans_matrix",), 1e-8)
        assert relative_error(history.ssm_lp_trace()[:2], ref["lp_trace_em1"]) <= 1e-9


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_reference_em_twenty_iterations(case):
    ref = reference(case)
    model, _, history = em_from_init(case)
    assert history.n_iters == 20 and history.stop_reason == "n_iters"
    train_ll = history.train_log_likelihoods[-1]
    test_ll = model.log_likelihood(reference_sequences(ref, "test"))
    assert train_ll == pytest.approx(model.log_likelihood(reference_sequences(ref, "train")), rel=1e-12)
    if case in RECURRENT_CASES:
        # ssm's transition M-step is an L-BFGS run; the README's contract is 1e-3.
        assert relative_error(train_ll, ref["ll_train_fit"]) <= 1e-3
        assert relative_error(test_ll, ref["ll_test_fit"]) <= 1e-3
        return
    assert_parameters_match(model, ref, "fit", ("As", "bs", "Sigmas", "nus", "pi0", "trans_matrix"), 1e-8)
    assert relative_error(history.ssm_lp_trace(), ref["lp_trace"]) <= 1e-9
    assert relative_error(train_ll, ref["ll_train_fit"]) <= 1e-9
    assert relative_error(test_ll, ref["ll_test_fit"]) <= 1e-9


# ---------------------------------------------------------------- brute force

def random_parameters(config: ARHMMConfig, n_dims: int, seed: int) -> ARHMMParameters:
    rng = np.random.default_rng(seed)
    n_states, lags = config.n_arhmm_states, config.n_arhmm_lags
    if config.is_diagonal:
        Sigmas = np.stack([np.diag(rng.uniform(0.2, 1.0, n_dims)) for _ in range(n_states)])
    else:
        factors = rng.normal(0, 0.5, (n_states, n_dims, n_dims))
        Sigmas = factors @ factors.transpose(0, 2, 1) + 0.3 * np.eye(n_dims)
    values = {"log_pi0": rng.normal(size=n_states),
              "As": 0.4 * rng.normal(size=(n_states, n_dims, n_dims * lags)),
              "bs": rng.normal(size=(n_states, n_dims)), "Sigmas": Sigmas}
    if config.transitions != "recurrent_only":
        values["log_Ps"] = rng.normal(size=(n_states, n_states))
    if config.is_recurrent:
        values["Rs"] = rng.normal(size=(n_states, n_dims))
    if config.transitions == "recurrent_only":
        values["r"] = rng.normal(size=n_states)
    if config.is_studentst:
        values["nus"] = rng.uniform(2, 8, n_states)
    return ARHMMParameters(**{name: torch.tensor(value) for name, value in values.items()})


def brute_force(params: ARHMMParameters, config: ARHMMConfig, x: np.ndarray):
    """log p(x), the best path and the posteriors, summing over every path with scipy's
    densities (nothing shared with the engine)."""
    p = {name: t.numpy() for name, t in params.tensors().items()}
    n_states, lags = config.n_arhmm_states, config.n_arhmm_lags
    n_steps, n_dims = x.shape
    emissions = np.empty((n_steps, n_states))
    for t, k in itertools.product(range(n_steps), range(n_states)):
        if t < lags:
            emissions[t, k] = stats.multivariate_normal(np.zeros(n_dims), np.eye(n_dims)).logpdf(x[t])
            continue
        history = np.concatenate([x[t - lag] for lag in range(1, lags + 1)]) if lags else np.zeros(0)
        mean = p["As"][k] @ history + p["bs"][k]
        if config.is_studentst:
            emissions[t, k] = stats.multivariate_t(mean, p["Sigmas"][k], df=p["nus"][k]).logpdf(x[t])
        else:
            emissions[t, k] = stats.multivariate_normal(mean, p["Sigmas"][k]).logpdf(x[t])
    if config.transitions in ("stationary", "sticky"):
        transition = np.repeat(np.log(softmax(p["log_Ps"], axis=1))[None], n_steps - 1, axis=0)
    elif config.transitions == "recurrent":
        transition = np.log(softmax(p["log_Ps"][None] + (x[:-1] @ p["Rs"].T)[:, None, :], axis=2))
    else:
        rows = np.log(softmax(p["r"] + x[:-1] @ p["Rs"].T, axis=1))
        transition = np.repeat(rows[:, None, :], n_states, axis=1)

    paths = np.array(list(itertools.product(range(n_states), repeat=n_steps)))
    steps = np.arange(n_steps)
    joint = (np.log(softmax(p["log_pi0"]))[paths[:, 0]] + emissions[steps, paths].sum(1)
             + transition[steps[:-1], paths[:, :-1], paths[:, 1:]].sum(1))
    log_likelihood = logsumexp(joint)
    weights = np.exp(joint - log_likelihood)
    marginals = np.stack([np.bincount(paths[:, t], weights, n_states) for t in steps])
    pairs = np.zeros((n_states, n_states))
    for t in steps[:-1]:
        np.add.at(pairs, (paths[:, t], paths[:, t + 1]), weights)
    return log_likelihood, paths[np.argmax(joint)], marginals, pairs


@pytest.fixture(params=["chunked", "plain"])
def recursions(request, monkeypatch):
    """The messages cut into chunks (what narrow batches get) or one loop over time (wide ones)."""
    monkeypatch.setattr(messages, "CPU_CHUNKED_WORK_LIMIT", 10**9 if request.param == "chunked" else 0)
    return request.param


@pytest.mark.parametrize("transitions", TRANSITIONS)
@pytest.mark.parametrize("noise_type", NOISE_TYPES)
@pytest.mark.parametrize("lags", [0, 1, 2])
def test_inference_matches_brute_force_enumeration(lags, noise_type, transitions, recursions):
    config = ARHMMConfig(dtype="float64", n_arhmm_states=3, n_arhmm_lags=lags, noise_type=noise_type, transitions=transitions,
                         kappa=2.0 if transitions == "sticky" else 0.0)
    seed = 100 * lags + 10 * NOISE_TYPES.index(noise_type) + TRANSITIONS.index(transitions)
    params = random_parameters(config, n_dims=2, seed=seed)
    model = ARHMM(config, params)
    rng = np.random.default_rng(seed)
    # Two lengths, so the shorter sequence sits in padding.
    sequences = [rng.normal(size=(6, 2)), rng.normal(size=(4, 2))]

    log_likelihoods = model.log_likelihood(sequences, per_sequence=True)
    paths = model.viterbi(sequences)
    posterior = model.expected_states(sequences)
    all_pairs = 0
    for n, x in enumerate(sequences):
        expected_ll, best_path, marginals, pairs = brute_force(params, config, x)
        assert log_likelihoods[n].item() == pytest.approx(expected_ll, rel=1e-12, abs=1e-12)
        np.testing.assert_array_equal(paths[n].numpy(), best_path)
        np.testing.assert_allclose(posterior.expected_states[n].numpy(), marginals, atol=1e-12)
        all_pairs = all_pairs + pairs
    np.testing.assert_allclose(posterior.expected_joints.numpy(), all_pairs, atol=1e-12)


# ---------------------------------------------------------------- EM and numerics

def sample_well_separated(noise_type="gaussian", transitions="sticky", n_sequences=6, n_steps=200, seed=0):
    """A 3-state, 2-D AR(1) model whose states have distinct fixed points, and its samples."""
    config = ARHMMConfig(dtype="float64", n_arhmm_states=3, n_arhmm_lags=1, noise_type=noise_type, transitions=transitions,
                         kappa=5.0 if transitions == "sticky" else 0.0)
    fixed_points = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]], dtype=torch.float64)
    As = 0.5 * torch.eye(2, dtype=torch.float64).repeat(3, 1, 1)
    values = {"log_pi0": torch.zeros(3, dtype=torch.float64), "As": As, "bs": 0.5 * fixed_points,
              "Sigmas": torch.diag_embed(torch.tensor([[0.02, 0.03], [0.03, 0.02], [0.025, 0.025]],
                                                      dtype=torch.float64))}
    if transitions != "recurrent_only":
        values["log_Ps"] = torch.log(torch.full((3, 3), 0.025, dtype=torch.float64).fill_diagonal_(0.95))
    if config.is_recurrent:
        values["Rs"] = torch.zeros(3, 2, dtype=torch.float64)
    if transitions == "recurrent_only":
        values["r"] = torch.zeros(3, dtype=torch.float64)
    if config.is_studentst:
        values["nus"] = torch.tensor([6.0, 8.0, 10.0], dtype=torch.float64)
    truth = ARHMM(config, ARHMMParameters(**values))
    states, observations = truth.sample(n_steps, n_sequences=n_sequences, seed=seed)
    return truth, states, list(observations)


def map_objective(model: ARHMM, sequences) -> float:
    """What ssm's Gaussian M-steps maximise: the log-likelihood plus the sticky prior, the
    inverse-Wishart prior (nu0 = 1e-4, Psi0 = 1e-4 I) and the regression prior (J0 = 1e-8 I
    around the identity lag-1 block)."""
    p = model.parameters
    n_dims = p.bs.shape[1]
    weights = torch.cat([p.As.transpose(1, 2), p.bs[:, None]], dim=1)
    prior_mean = torch.zeros_like(weights[0])
    prior_mean[:n_dims] = torch.eye(n_dims, dtype=weights.dtype)
    precisions = torch.linalg.inv(p.Sigmas)
    inverse_wishart = (-(1e-4 + n_dims + 1) / 2 * torch.logdet(p.Sigmas)
                       - 0.5e-4 * precisions.diagonal(dim1=1, dim2=2).sum(-1)).sum()
    offset = weights - prior_mean
    regression = -0.5e-8 * torch.einsum("kde,kpd,kpe->", precisions, offset, offset)
    return model.log_likelihood(sequences) + model.log_prior() + inverse_wishart.item() + regression.item()


@pytest.mark.parametrize("transitions", ["stationary", "sticky"])
@pytest.mark.parametrize("noise_type", ["gaussian", "diagonal_gaussian"])
def test_em_never_decreases_the_objective_of_exact_m_steps(noise_type, transitions):
    _, _, sequences = sample_well_separated(noise_type, transitions, seed=3)
    # One state more than the truth, so one state is thin and its priors matter.
    config = ARHMMConfig(dtype="float64", n_arhmm_states=4, n_arhmm_lags=1, noise_type=noise_type, transitions=transitions,
                         kappa=5.0 if transitions == "sticky" else 0.0, rng_seed_model=7)
    model = ARHMM(config)
    model.initialize(sequences)
    objectives = [map_objective(model, sequences)]
    history = model.fit(sequences, n_iters=25,
                        callback=lambda *_: objectives.append(map_objective(model, sequences)))
    steps = np.diff(objectives)
    assert steps.min() >= -1e-9 * abs(objectives[-1]), f"EM decreased its objective by {-steps.min():.3g}"
    assert objectives[-1] - objectives[0] > 1.0
    # The log-likelihood alone may dip where the inverse-Wishart prior's (D + 1) shrinkage
    # pulls a thin state, but only by a hair.
    assert np.diff(history.train_log_likelihoods).min() >= -1e-3


def test_float32_agrees_with_float64():
    truth, _, sequences = sample_well_separated("studentst", "sticky", n_sequences=10, n_steps=300, seed=4)
    single = truth.to(dtype="float32")
    assert single.parameters.bs.dtype == torch.float32
    ll64 = truth.log_likelihood(sequences, per_sequence=True)
    ll32 = single.log_likelihood(sequences, per_sequence=True)
    assert ll32.dtype == torch.float32
    assert relative_error(ll32, ll64) <= 1e-5
    posterior64, posterior32 = truth.expected_states(sequences), single.expected_states(sequences)
    for states64, states32 in zip(posterior64.expected_states, posterior32.expected_states):
        assert absolute_error(states32, states64) <= 1e-3
    for path64, path32 in zip(truth.viterbi(sequences), single.viterbi(sequences)):
        assert (path64 == path32).float().mean() >= 0.99
    # EM in float32 follows the float64 run (here ssm's nu update moves away from the truth).
    history32 = single.fit(sequences, n_iters=5)
    history64 = ARHMM.from_state_dict(truth.config, truth.state_dict()).fit(sequences, n_iters=5)
    assert relative_error(history32.train_log_likelihoods, history64.train_log_likelihoods) <= 1e-4


@pytest.mark.parametrize("shared", [True, False])
def test_chunked_messages_match_one_loop_over_time(shared, monkeypatch):
    """Long sequences of unequal lengths, where chunks end inside the padding and the chunk
    passes carry states of very different likelihood."""
    generator = torch.Generator().manual_seed(3)
    n_states, n_steps, n_seq = 5, 2000, 3
    log_likes = 8 * torch.randn(n_states, n_steps, n_seq, generator=generator, dtype=torch.float64)
    mask = torch.arange(n_steps)[:, None] < torch.tensor([n_steps, 1377, 2])
    shape = (n_states, n_states) if shared else (n_steps - 1, n_seq, n_states, n_states)
    log_trans = torch.log_softmax(3 * torch.randn(shape, generator=generator, dtype=torch.float64), -1)
    if not shared:
        log_trans = log_trans.permute(2, 3, 0, 1)
    log_pi0 = torch.log_softmax(torch.randn(n_states, generator=generator, dtype=torch.float64), -1)
    results = {}
    for limit in (10**9, 0):
        monkeypatch.setattr(messages, "CPU_CHUNKED_WORK_LIMIT", limit)
        results[limit] = messages.forward_backward(log_pi0, log_trans, log_likes, mask)
    chunked, plain = results[10**9], results[0]
    assert relative_error(chunked.log_normalizers, plain.log_normalizers) <= 1e-12
    assert absolute_error(chunked.expected_states, plain.expected_states) <= 1e-10
    assert absolute_error(chunked.expected_joints, plain.expected_joints) <= 1e-8
    assert chunked.expected_states[:, 1377:, 1].abs().max() == 0


def test_moments_of_a_nearly_unused_state_keep_all_its_frames():
    """Frames of negligible weight are left out relative to a state's own largest weight:
    a state every frame gives 1e-30 has the moments of all its frames (not zero, which
    would collapse a Student-t scale), as a state of ordinary weights has."""
    from bnet.models.arhmm import observations

    _, _, sequences = sample_well_separated("gaussian", "stationary", n_sequences=3, n_steps=100, seed=6)
    batch = ARHMM(ARHMMConfig(n_arhmm_states=2, n_arhmm_lags=1)).batch(sequences)
    ordinary = torch.rand(batch.time_mask.shape, generator=torch.Generator().manual_seed(0)) * batch.ar_time_mask
    weights = torch.stack([ordinary, 1e-30 * ordinary])
    moments = observations._weighted_moments(batch, weights)
    assert torch.allclose(moments[1] * 1e30, moments[0], rtol=1e-4)
    assert moments[0].abs().max() > 1


def test_float32_em_ends_where_float64_does_on_data_far_from_zero():
    """float32 (the default) against float64 from one start, on data offset by 50: the
    moments are taken about the mean frame, so the offset costs float32 no precision."""
    _, _, sequences = sample_well_separated("gaussian", "stationary", n_sequences=12, n_steps=300, seed=5)
    shifted = [x + 50.0 for x in sequences]
    train, test = shifted[:9], shifted[9:]
    start = ARHMM(ARHMMConfig(dtype="float64", n_arhmm_states=3, n_arhmm_lags=1, rng_seed_model=2))
    start.initialize(train)
    fitted = {dtype: start.to(dtype=dtype) for dtype in ("float32", "float64")}
    for model in fitted.values():
        model.fit(train, n_iters=15)
    held_out = {dtype: model.log_likelihood_per_step(test) for dtype, model in fitted.items()}
    assert abs(held_out["float32"] - held_out["float64"]) <= 1e-5
    assert held_out["float64"] >= start.log_likelihood_per_step(test) + 0.1
    assert absolute_error(fitted["float32"].parameters.Sigmas, fitted["float64"].parameters.Sigmas) <= 1e-4


@pytest.mark.parametrize("transitions", ["sticky", "recurrent"])
def test_unequal_lengths_batch_like_single_sequences(transitions):
    config = ARHMMConfig(dtype="float64", n_arhmm_states=3, n_arhmm_lags=2, noise_type="gaussian", transitions=transitions,
                         kappa=2.0 if transitions == "sticky" else 0.0)
    model = ARHMM(config, random_parameters(config, n_dims=3, seed=11))
    rng = np.random.default_rng(11)
    sequences = [rng.normal(size=(length, 3)) for length in (7, 40, 19, 3)]
    batched = model.expected_states(sequences)
    batched_paths = model.viterbi(sequences)
    batched_likes = model.emission_log_likelihoods(sequences)
    joints_alone = 0
    for n, x in enumerate(sequences):
        alone = model.expected_states([x])
        assert batched.log_likelihoods[n].item() == pytest.approx(alone.log_likelihoods[0].item(), rel=1e-13)
        assert absolute_error(batched.expected_states[n], alone.expected_states[0]) <= 1e-13
        joints_alone = joints_alone + alone.expected_joints
        assert torch.equal(batched_paths[n], model.viterbi([x])[0])
        assert absolute_error(batched_likes[n], model.emission_log_likelihoods([x])[0]) <= 1e-13
    assert absolute_error(batched.expected_joints, joints_alone) <= 1e-12


@pytest.mark.parametrize("noise_type", ["gaussian", "studentst"])
def test_em_ignores_padding_and_sequence_order(noise_type):
    _, _, sequences = sample_well_separated(noise_type, "recurrent", seed=5)
    sequences = [x[:length] for x, length in zip(sequences, (200, 57, 131, 90, 173, 64))]
    config = ARHMMConfig(dtype="float64", n_arhmm_states=3, n_arhmm_lags=1, noise_type=noise_type, transitions="recurrent")
    start = ARHMM(config)
    start.initialize(sequences)

    def fitted(data) -> dict[str, torch.Tensor]:
        model = ARHMM.from_state_dict(config, start.state_dict())
        model.fit(data, n_iters=3)
        return model.state_dict()

    clean = fitted(sequences)
    batch = start.batch(sequences)
    noise = torch.randn(batch.x.shape, generator=torch.Generator().manual_seed(0), dtype=batch.x.dtype)
    noisy_padding = torch.where(batch.mask[..., None], batch.x, 1e3 * noise)
    garbage = dataclasses.replace(batch, x=noisy_padding, design=lagged_design(noisy_padding, batch.lags))
    for other in (fitted(garbage), fitted(sequences[::-1])):
        for name, value in clean.items():
            assert absolute_error(other[name], value) <= 1e-9, name


# ---------------------------------------------------------------- API

@pytest.mark.parametrize("noise_type, transitions",
                         [("studentst", "recurrent_only"), ("diagonal_gaussian", "sticky")])
def test_checkpoint_round_trip_loads_with_weights_only(tmp_path, noise_type, transitions):
    _, _, sequences = sample_well_separated(noise_type, transitions, n_sequences=3, n_steps=100, seed=6)
    config = ARHMMConfig(dtype="float64", n_arhmm_states=3, n_arhmm_lags=1, noise_type=noise_type, transitions=transitions,
                         kappa=5.0 if transitions == "sticky" else 0.0)
    model = ARHMM(config)
    model.fit(sequences, n_iters=3)
    path = tmp_path / "arhmm.pt"
    torch.save({"config": config.to_dict(), "state": model.state_dict()}, path)
    checkpoint = torch.load(path, weights_only=True)
    restored = ARHMM.from_state_dict(ARHMMConfig.from_dict(checkpoint["config"]), checkpoint["state"])
    assert restored.config == config
    assert restored.log_likelihood(sequences) == model.log_likelihood(sequences)
    assert all(torch.equal(a, b) for a, b in zip(restored.viterbi(sequences), model.viterbi(sequences)))


def test_callback_sees_current_parameters_and_can_stop():
    _, _, sequences = sample_well_separated(seed=8)
    train, val = sequences[:4], sequences[4:]
    model = ARHMM(ARHMMConfig(dtype="float64", n_arhmm_states=3, transitions="sticky", kappa=5.0))
    seen = []

    def stop_at_two(iteration, train_ll, val_ll):
        assert train_ll == pytest.approx(model.log_likelihood(train), rel=1e-12)
        assert val_ll == pytest.approx(model.log_likelihood(val), rel=1e-12)
        seen.append(iteration)
        return iteration == 2

    history = model.fit(train, n_iters=10, callback=stop_at_two, val_sequences=val)
    assert seen == [1, 2]
    assert history.stop_reason == "callback" and history.n_iters == 2
    assert len(history.val_log_likelihoods) == 3


def test_callback_exception_propagates_unchanged():
    class Pruned(Exception):
        pass

    _, _, sequences = sample_well_separated(seed=9)
    model = ARHMM(ARHMMConfig(dtype="float64", n_arhmm_states=3))
    raised = Pruned("prune at 3")

    def prune(iteration, train_ll, val_ll):
        assert val_ll is None
        if iteration == 3:
            raise raised

    with pytest.raises(Pruned) as caught:
        model.fit(sequences, n_iters=10, callback=prune)
    assert caught.value is raised


def test_relative_tolerance_stops_em():
    _, _, sequences = sample_well_separated(seed=10)
    model = ARHMM(ARHMMConfig(dtype="float64", n_arhmm_states=3, n_iters=100, arhmm_es_tol=1e-4))
    history = model.fit(sequences)
    changes = np.abs(np.diff(history.train_log_likelihoods)) / np.abs(history.train_log_likelihoods[:-1])
    assert history.stop_reason == "tolerance" and history.n_iters < 100
    assert changes[-1] <= 1e-4 and (changes[:-1] > 1e-4).all()


def test_kmeans_initialisation_is_seeded_and_finds_the_states():
    _, states, sequences = sample_well_separated(seed=12)
    first, second = (ARHMM(ARHMMConfig(dtype="float64", n_arhmm_states=3, rng_seed_model=1)) for _ in range(2))
    first.initialize(sequences)
    second.initialize(sequences)
    first_state, second_state = first.state_dict(), second.state_dict()
    assert all(torch.equal(first_state[name], second_state[name]) for name in first_state)
    # Before any EM, the k-means regressions already separate the states (up to labels).
    paths = torch.stack(first.viterbi(sequences))[:, 1:].reshape(-1)
    truth_paths = states[:, 1:].reshape(-1)
    best = max((torch.tensor(perm)[paths] == truth_paths).float().mean().item()
               for perm in itertools.permutations(range(3)))
    assert best >= 0.9


def test_samples_follow_the_model():
    truth, states, sequences = sample_well_separated(n_sequences=10, n_steps=400, seed=13)
    counts = np.zeros((3, 3))
    for path in states.numpy():
        np.add.at(counts, (path[:-1], path[1:]), 1)
    empirical = counts / counts.sum(1, keepdims=True)
    assert absolute_error(empirical, torch.softmax(truth.parameters.log_Ps, -1)) <= 0.03
    recovered = torch.stack(truth.viterbi(sequences))
    assert (recovered == states).float().mean() >= 0.95


@pytest.mark.parametrize("noise_type", NOISE_TYPES)
def test_sampled_innovations_have_the_model_covariance(noise_type):
    truth, states, sequences = sample_well_separated(noise_type, n_sequences=8, n_steps=1000, seed=14)
    p = truth.parameters
    x = torch.stack(sequences)
    predicted = (p.As[states[:, 1:]] @ x[:, :-1].unsqueeze(-1)).squeeze(-1) + p.bs[states[:, 1:]]
    innovations = x[:, 1:] - predicted
    for k in range(3):
        chosen = innovations[states[:, 1:] == k]
        expected = p.Sigmas[k] * (p.nus[k] / (p.nus[k] - 2) if p.nus is not None else 1.0)
        assert relative_error(torch.diagonal(torch.cov(chosen.T)), torch.diagonal(expected)) <= 0.15


def test_permute_states_by_usage():
    _, _, sequences = sample_well_separated(seed=15)
    model = ARHMM(ARHMMConfig(dtype="float64", n_arhmm_states=3, transitions="sticky", kappa=5.0))
    model.fit(sequences, n_iters=5)
    before_ll, before_paths = model.log_likelihood(sequences), model.viterbi(sequences)
    permutation = model.permute_states_by_usage(sequences)
    usage = torch.cat(model.expected_states(sequences).expected_states).sum(0)
    assert (usage[:-1] >= usage[1:]).all()
    assert model.log_likelihood(sequences) == pytest.approx(before_ll, rel=1e-12)
    relabel = torch.argsort(permutation)
    for before, after in zip(before_paths, model.viterbi(sequences)):
        assert torch.equal(relabel[before], after)


def test_log_likelihood_per_step_is_per_frame_and_dimension():
    truth, _, sequences = sample_well_separated(n_sequences=3, seed=16)
    n_values = sum(x.shape[0] * x.shape[1] for x in sequences)
    expected = truth.log_likelihood(sequences) / n_values
    assert truth.log_likelihood_per_step(sequences) == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- errors

def test_more_states_than_frames_is_an_error():
    model = ARHMM(ARHMMConfig(dtype="float64", n_arhmm_states=10, n_arhmm_lags=1))
    with pytest.raises(ARHMMDataError, match="n_arhmm_states=10") as caught:
        model.fit([np.random.default_rng(0).normal(size=(5, 2))], n_iters=1)
    assert isinstance(caught.value, ValueError)


def test_lags_not_shorter_than_a_sequence_is_an_error():
    model = ARHMM(ARHMMConfig(dtype="float64", n_arhmm_states=2, n_arhmm_lags=3))
    rng = np.random.default_rng(0)
    with pytest.raises(ARHMMDataError, match="n_arhmm_lags=3.*sequence 1 has 3"):
        model.fit([rng.normal(size=(20, 2)), rng.normal(size=(3, 2))], n_iters=1)


def test_nan_in_data_is_an_error():
    data = np.random.default_rng(0).normal(size=(20, 2))
    data[4, 1] = np.nan
    with pytest.raises(ARHMMDataError, match="sequence 1 contains NaN"):
        ARHMM(ARHMMConfig(dtype="float64", n_arhmm_states=2)).fit([data[10:], data], n_iters=1)


def test_dimension_mismatch_is_an_error():
    truth, _, _ = sample_well_separated(n_sequences=1, n_steps=20)
    with pytest.raises(ARHMMDataError, match="3 dimensions, the model 2"):
        truth.log_likelihood([np.zeros((10, 3))])


@pytest.mark.parametrize("options, message", [
    ({"transitions": "stationary", "kappa": 1.0}, "kappa=1.0 only acts on sticky transitions"),
    ({"transitions": "recurrent", "alpha": 2.0}, "alpha=2.0 only acts on sticky transitions"),
    ({"transitions": "sticky", "alpha": 0.5}, "alpha must be at least 1"),
    ({"noise_type": "poisson"}, "noise_type must be one of"),
    ({"transitions": "inputdriven"}, "transitions must be one of"),
    ({"n_arhmm_lags": -1}, "n_arhmm_lags"),
    ({"dtype": "float16"}, "dtype"),
])
def test_invalid_options_are_errors_that_name_the_option(options, message):
    with pytest.raises(ARHMMConfigError, match=message) as caught:
        ARHMMConfig(n_arhmm_states=3, **options)
    assert isinstance(caught.value, ValueError)


def test_state_dict_must_fit_the_config():
    truth, _, _ = sample_well_separated(n_sequences=1, n_steps=20)
    with pytest.raises(ARHMMConfigError, match="needs parameters"):
        ARHMM.from_state_dict(ARHMMConfig(dtype="float64", n_arhmm_states=3, noise_type="studentst", transitions="sticky",
                                          kappa=5.0), truth.state_dict())
    with pytest.raises(ARHMMConfigError, match="n_arhmm_states=4"):
        ARHMM.from_state_dict(ARHMMConfig(dtype="float64", n_arhmm_states=4, transitions="sticky", kappa=5.0),
                              truth.state_dict())
