"""The Bayesian decoder's inference, checked exactly against closed forms on tiny problems."""

import numpy as np
import pytest
import torch

from bnet.errors import ConfigError

from bnet.models.bayesian_decoding import (
    CLAMP, ARHMMPrior, SwitchingDynamics, ar_log_likelihoods, decode, gibbs, prior_marginals, pseudo_observations,
    sample_state_paths, smooth, state_posterior, stationary_distribution,
)

DOUBLE = {"dtype": torch.float64}


def _random_hmm(k=3, n=2, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    log_P = torch.log_softmax(torch.randn(k, k, generator=g, **DOUBLE) + 2 * torch.eye(k, **DOUBLE), -1)
    log_pi0 = torch.log_softmax(torch.randn(k, generator=g, **DOUBLE), -1)
    potentials = torch.randn(n, t, k, generator=g, **DOUBLE)
    return log_pi0, log_P, potentials


def _random_dynamics(k=2, d=2, lags=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    As = 0.4 * torch.randn(k, d, d * lags, generator=g, **DOUBLE)
    bs = torch.randn(k, d, generator=g, **DOUBLE)
    roots = torch.randn(k, d, d, generator=g, **DOUBLE)
    Sigmas = roots @ roots.transpose(-1, -2) + 0.3 * torch.eye(d, **DOUBLE)
    root = torch.randn(d, d, generator=g, **DOUBLE)
    return SwitchingDynamics.from_arhmm(As, bs, Sigmas, torch.randn(d, generator=g, **DOUBLE),
                                        root @ root.T + torch.eye(d, **DOUBLE))


def test_the_stationary_distribution_is_left_fixed_by_the_transitions():
    _, log_P, _ = _random_hmm(k=4)
    pi = stationary_distribution(log_P)
    torch.testing.assert_close(pi @ log_P.exp(), pi, atol=1e-12, rtol=0)
    assert float(pi.sum()) == pytest.approx(1.0) and bool((pi > 0).all())


def test_sampled_state_paths_have_the_forward_backward_marginals():
    log_pi0, log_P, potentials = _random_hmm()
    paths = sample_state_paths(log_pi0, log_P, potentials, 40000, torch.Generator().manual_seed(1))
    sampled = torch.nn.functional.one_hot(paths, 3).double().mean(0)
    exact = state_posterior(log_pi0, log_P, potentials).probabilities
    assert float((sampled - exact).abs().max()) < 0.02


def _dense_latents(dynamics, path):
    """Mean and covariance of every frame's latents given a state path, built directly as one
    Gaussian: s = M u + c, u = (s_start, w_first, ..., w_T-1), with an HMM's first frame drawn
    from its state like the others."""
    size, d, n_steps = dynamics.initial_mean.shape[0], dynamics.n_dims, len(path)
    first = 0 if dynamics.n_lags == 0 else 1  # the first step that is predicted
    n_noise = n_steps - first
    mean, maps = [dynamics.initial_mean], [[torch.eye(size, **DOUBLE)] + [torch.zeros(size, size, **DOUBLE)] * n_noise]
    for t in range(first, n_steps):
        F, g = dynamics.transition[path[t]], dynamics.offset[path[t]]
        mean.append(F @ mean[-1] + g)
        row = [F @ block for block in maps[-1]]
        row[t - first + 1] = torch.eye(size, **DOUBLE)
        maps.append(row)
    if first == 0:  # the start state is only where an HMM's frames are drawn from
        mean, maps = mean[1:], maps[1:]
    M = torch.cat([torch.cat(row, 1) for row in maps], 0)
    u_cov = torch.block_diag(dynamics.initial_cov, *[dynamics.noise[path[t]] for t in range(first, n_steps)])
    s_mean, s_cov = torch.cat(mean), M @ u_cov @ M.T
    pick = torch.cat([torch.arange(t * size, t * size + d) for t in range(n_steps)])
    return s_mean[pick], s_cov[pick][:, pick]


def _dense_posterior(dynamics, path, observations, variances):
    """E[x | y] and Cov[x | y] by conditioning the joint Gaussian of every frame's latents."""
    x_mean, x_cov = _dense_latents(dynamics, path)
    gain = torch.linalg.solve(x_cov + torch.diag(variances.reshape(-1)), x_cov).T
    mean = x_mean + gain @ (observations.reshape(-1) - x_mean)
    return mean.reshape(len(path), -1), x_cov - gain @ x_cov


def test_the_companion_form_is_the_arhmm_regression():
    g = torch.Generator().manual_seed(9)
    As, bs = torch.randn(2, 3, 6, generator=g, **DOUBLE), torch.randn(2, 3, generator=g, **DOUBLE)
    dynamics = SwitchingDynamics.from_arhmm(As, bs, torch.eye(3, **DOUBLE).expand(2, 3, 3), torch.zeros(3, **DOUBLE),
                                            torch.eye(3, **DOUBLE))
    x_1, x_2 = torch.randn(3, generator=g, **DOUBLE), torch.randn(3, generator=g, **DOUBLE)  # x_{t-1}, x_{t-2}
    step = dynamics.transition[1] @ torch.cat([x_1, x_2]) + dynamics.offset[1]
    torch.testing.assert_close(step[:3], As[1] @ torch.cat([x_1, x_2]) + bs[1])  # ssm: lag 1 first
    torch.testing.assert_close(step[3:], x_1)


@pytest.mark.parametrize("lags", [0, 1, 2])
def test_the_smoother_mean_is_dense_gaussian_conditioning(lags):
    dynamics = _random_dynamics(lags=lags)
    g = torch.Generator().manual_seed(2)
    path = torch.tensor([[0, 0, 1, 1, 0]])
    observations = torch.randn(1, 5, 2, generator=g, **DOUBLE)
    variances = 0.1 + torch.rand(1, 5, 2, generator=g, **DOUBLE)
    smoothed = smooth(dynamics, path, observations, variances, sample=False)
    expected, cov = _dense_posterior(dynamics, path[0], observations[0], variances[0])
    assert float((smoothed.means[0] - expected).abs().max()) < 1e-8
    assert float((smoothed.variances[0].reshape(-1) - cov.diagonal()).abs().max()) < 1e-8


def test_smoothed_draws_have_the_posterior_mean_and_covariance():
    dynamics = _random_dynamics(lags=2)
    path = torch.tensor([[0, 1, 1, 0]]).expand(40000, -1)
    observations = torch.full((40000, 4, 2), 0.5, **DOUBLE)
    smoothed = smooth(dynamics, path, observations, torch.full_like(observations, 0.2),
                      torch.Generator().manual_seed(3))
    mean, cov = _dense_posterior(dynamics, path[0], observations[0], torch.full((4, 2), 0.2, **DOUBLE))
    draws = smoothed.samples.reshape(40000, -1)
    assert float((draws.mean(0) - mean.reshape(-1)).abs().max()) < 0.03
    assert float((torch.cov(draws.T) - cov).abs().max()) < 0.03 * float(cov.abs().max())


@pytest.mark.parametrize("lags", [0, 2])
def test_the_prior_marginals_are_the_latents_given_the_path_alone(lags):
    dynamics = _random_dynamics(lags=lags)
    path = torch.tensor([[1, 0, 0, 1, 1, 0]])
    means, variances = prior_marginals(dynamics, path)
    x_mean, x_cov = _dense_latents(dynamics, path[0])
    assert float((means[0].reshape(-1) - x_mean).abs().max()) < 1e-10
    assert float((variances[0].reshape(-1) - x_cov.diagonal()).abs().max()) < 1e-10
    flat = smooth(dynamics, path, torch.zeros(1, 6, 2, **DOUBLE), torch.full((1, 6, 2), 1e12, **DOUBLE), sample=False)
    torch.testing.assert_close(flat.means, means, atol=1e-6, rtol=0)


def test_pseudo_observations_divide_the_decoder_by_the_prior():
    decoder_mean, decoder_var = torch.tensor([[[1.0, -2.0]]], **DOUBLE), torch.tensor([0.5, 3.0], **DOUBLE)
    prior_mean, prior_var = torch.tensor([[[0.2, 0.4]]], **DOUBLE), torch.tensor([[[2.0, 1.0]]], **DOUBLE)
    pseudo = pseudo_observations(decoder_mean, decoder_var, prior_mean, prior_var, scale=1.0)
    # dimension 0: 1/r = 1/0.5 - 1/2; the product of the prior and the pseudo-likelihood is the decoder's Gaussian
    assert float(pseudo.variances[0, 0, 0]) == pytest.approx(1 / (1 / 0.5 - 1 / 2.0))
    product_precision = 1 / 2.0 + 1 / pseudo.variances[0, 0, 0]
    product_mean = (0.2 / 2.0 + pseudo.values[0, 0, 0] / pseudo.variances[0, 0, 0]) / product_precision
    assert float(product_precision) == pytest.approx(1 / 0.5) and float(product_mean) == pytest.approx(1.0)
    # dimension 1: the decoder is less sure than the prior: clamped just below it, and counted
    assert pseudo.clamped.tolist() == [[[False, True]]]
    assert float(pseudo.variances[0, 0, 1]) == pytest.approx(1 / (1 / (CLAMP * 1.0) - 1.0))


def _prior(k=3, d=2, lags=1, seed=0):
    dynamics = _random_dynamics(k=k, d=d, lags=lags, seed=seed)
    _, log_P, _ = _random_hmm(k=k, seed=seed)
    return ARHMMPrior(log_P, stationary_distribution(log_P).log(), dynamics)


def test_a_fixed_seed_gives_identical_posteriors_and_another_seed_other_draws():
    prior = _prior()
    g = torch.Generator().manual_seed(4)
    decoder_mean = torch.randn(2, 8, 2, generator=g, **DOUBLE)
    state_probs = torch.softmax(torch.randn(2, 8, 3, generator=g, **DOUBLE), -1)
    runs = [decode(prior, decoder_mean, torch.tensor([0.3, 0.3], **DOUBLE), state_probs, 10.0, 5,
                   torch.Generator().manual_seed(seed)) for seed in (7, 7, 8)]
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    assert not torch.equal(runs[0].samples, runs[2].samples)
    # with a generator per trial, a trial's draws are the same alone or beside another
    both = decode(prior, decoder_mean, torch.tensor([0.3, 0.3], **DOUBLE), state_probs, 10.0, 5,
                  [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    alone = decode(prior, decoder_mean[1:], torch.tensor([0.3, 0.3], **DOUBLE), state_probs[1:], 10.0, 5,
                   [torch.Generator().manual_seed(2)])
    torch.testing.assert_close(both.samples[:, 1], alone.samples[:, 0])
    torch.testing.assert_close(both.mean[1], alone.mean[0])
    assert runs[0].samples.shape == (5, 2, 8, 2) and runs[0].state_probabilities.shape == (2, 8, 3)
    torch.testing.assert_close(runs[0].state_probabilities.sum(-1), torch.ones(2, 8, **DOUBLE))


@pytest.mark.parametrize("lags", [0, 1])
def test_the_prior_divided_out_exactly_clamps_most_frames_and_a_loose_one_few(lags):
    prior = _prior(lags=lags)
    g = torch.Generator().manual_seed(5)
    decoder_mean = torch.randn(3, 20, 2, generator=g, **DOUBLE)
    state_probs = torch.full((3, 20, 3), 1 / 3, **DOUBLE)
    decoder_var = torch.tensor([5.0, 5.0], **DOUBLE)
    exact = decode(prior, decoder_mean, decoder_var, state_probs, 1.0, 2, torch.Generator().manual_seed(0))
    loose = decode(prior, decoder_mean, decoder_var, state_probs, 1e6, 2, torch.Generator().manual_seed(0))
    assert bool((exact.clamped_fraction > 0.5).all()) and bool((loose.clamped_fraction < 0.5).all())
    # clamped frames are uninformative, not wild: the posterior stays near the data
    assert float(exact.mean.abs().max()) < 3 * float(decoder_mean.abs().max())
    assert bool((exact.spread > 0).all()) and bool((loose.spread > 0).all())
    with pytest.raises(ConfigError, match="at least 1"):
        decode(prior, decoder_mean, decoder_var, state_probs, 0.5, 2)
    # a decoder far surer than the dynamics decides the posterior
    sure = decode(prior, decoder_mean, torch.tensor([1e-8, 1e-8], **DOUBLE), state_probs, 1e6, 2,
                  torch.Generator().manual_seed(0))
    assert float((sure.mean - decoder_mean).abs().max()) < 1e-4


@pytest.mark.slow
def test_the_prior_helps_where_the_neural_signal_is_weak_and_costs_nothing_where_it_is_strong():
    """Acceptance on synthetic sessions with true latents (bench/bayesian_decoding.py, 3 seeds):
    where the direct decoder's test R² is about 0.6 the Bayesian one gains at least 0.05 and
    its Viterbi states beat the state decoder's argmax; where it is about 0.95 it loses at most
    0.01; dividing the prior out exactly (c = 1) clamps most frames."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench" / "bayesian_decoding.py"
    result = subprocess.run([sys.executable, str(bench), "--noise", "0.5", "2", "--seeds", "0", "1", "2", "--json"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 6
    # the Gibbs sampler, a cross-check, agrees on one weak-signal setting
    gibbs_run = subprocess.run([sys.executable, str(bench), "--noise", "2", "--seeds", "1", "--method", "gibbs",
                                "--json"], capture_output=True, text=True, timeout=600)
    assert gibbs_run.returncode == 0, gibbs_run.stderr[-3000:]
    (cross,) = [json.loads(line) for line in gibbs_run.stdout.splitlines()]
    (default,) = [row for row in rows if row["noise"] == 2 and row["seed"] == 1]
    assert cross["bayes"] - cross["direct"] >= 0.05 and abs(cross["bayes"] - default["bayes"]) < 0.1, (cross, default)
    for row in rows:
        gain = row["bayes"] - row["direct"]
        if row["noise"] == 2:
            assert 0.5 < row["direct"] < 0.75 and gain >= 0.05, row
            assert row["viterbi_states"] > row["direct_states"], row
        else:
            assert row["direct"] > 0.9 and gain >= -0.01, row
        assert row["clamped_at_1"] > 0.5, row


def test_gibbs_with_one_state_is_the_smoother_over_stationary_pseudo_observations():
    prior = _prior(k=1, lags=1)
    g = torch.Generator().manual_seed(6)
    decoder_mean = torch.randn(2, 12, 2, generator=g, **DOUBLE)
    decoder_var = torch.tensor([0.4, 0.7], **DOUBLE)
    state_probs = torch.ones(2, 12, 1, **DOUBLE)
    posterior = gibbs(prior, decoder_mean, decoder_var, state_probs, 5.0, 3, torch.Generator().manual_seed(0),
                      burn_in=2)
    dynamics = prior.dynamics
    pseudo = pseudo_observations(decoder_mean, decoder_var, dynamics.initial_mean[:2].expand(2, 12, 2),
                                 dynamics.initial_cov.diagonal()[:2].expand(2, 12, 2), 5.0)
    expected = smooth(dynamics, torch.zeros(2, 12, dtype=torch.long), pseudo.values, pseudo.variances, sample=False)
    torch.testing.assert_close(posterior.mean, expected.means, atol=1e-10, rtol=0)
    assert posterior.samples.shape == (3, 2, 12, 2)


def test_the_ar_likelihood_is_the_arhmm_engines():
    from bnet.models.arhmm import ARHMM, ARHMMConfig

    g = torch.Generator().manual_seed(8)
    x = [torch.randn(15, 2, generator=g, **DOUBLE).numpy() for _ in range(2)]
    engine = ARHMM(ARHMMConfig(n_arhmm_states=3, n_arhmm_lags=2, n_iters=3, dtype="float64"))
    engine.fit(x)
    prior = ARHMMPrior.from_engine(engine, torch.zeros(2, **DOUBLE), torch.eye(2, **DOUBLE))
    ours = ar_log_likelihoods(prior.dynamics, torch.from_numpy(np.stack(x)))
    theirs = torch.stack(engine.emission_log_likelihoods(x))
    torch.testing.assert_close(ours[:, 2:], theirs[:, 2:].to(ours.dtype), atol=1e-8, rtol=1e-8)
