"""Every loss term of the AE family against a closed form on small inputs."""

import math

import numpy as np
import pytest
import torch

from bnet.models import build_model
from bnet.models.ae import AEConfig, LabelReadingConfig, anneal
from bnet.models.beta_tcvae import BetaTCVAEConfig
from bnet.models.msp import MSPConfig
from bnet.models.msps_vae import MSPSVAEConfig
from bnet.models.ps_vae import PSVAEConfig
from bnet.models.vae import VAEConfig
from bnet.models.ae_losses import (
    LOG_2PI, decomposed_kl, gaussian_kl, gaussian_log_density, gaussian_nll, label_mask, mean_abs_correlation,
    r2_score, reparameterize, session_triplets, triplet_loss,
)


def test_kl_of_the_standard_normal_is_zero_and_matches_the_closed_form():
    zeros = torch.zeros(5, 3)
    assert float(gaussian_kl(zeros, zeros)) == 0.0
    mean, logvar = torch.tensor([[1.0, -2.0]]), torch.tensor([[math.log(4.0), 0.0]])
    # KL(N(1, 4) || N(0, 1)) + KL(N(-2, 1) || N(0, 1)) = 0.5 (4 + 1 - log 4 - 1) + 0.5 * 4
    assert float(gaussian_kl(mean, logvar)) == pytest.approx(0.5 * (4 + 1 - math.log(4) - 1) + 2.0)


def test_gaussian_nll_of_x_under_mean_x_is_the_normalising_constant():
    x = torch.rand(4, 1, 3, 3)
    assert float(gaussian_nll(x, x, None)) == pytest.approx(0.5 * 9 * LOG_2PI)
    # one pixel off by 2 adds 0.5 * 4 to its frame's NLL; masked pixels count neither way
    y = x.clone()
    y[0, 0, 0, 0] += 2
    assert float(gaussian_nll(y, x, None)) == pytest.approx(0.5 * 9 * LOG_2PI + 2.0 / 4)
    mask = torch.ones_like(x)
    mask[0, 0, 0, 0] = 0
    assert float(gaussian_nll(y, x, mask)) == pytest.approx(0.5 * LOG_2PI * (36 - 1) / 4)


def test_reparameterisation_uses_exp_half_logvar_as_the_standard_deviation():
    torch.manual_seed(0)
    mean, logvar = torch.full((200_000, 1), 3.0), torch.full((200_000, 1), math.log(4.0))
    samples = reparameterize(mean, logvar)
    assert float(samples.mean()) == pytest.approx(3.0, abs=0.02)
    assert float(samples.std()) == pytest.approx(2.0, abs=0.02)  # sqrt(variance 4), not exp(logvar) = 4


def test_log_density_treats_exp_logvar_as_the_variance():
    value = gaussian_log_density(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(math.log(4.0)))
    assert float(value) == pytest.approx(-0.5 * (LOG_2PI + math.log(4.0) + 1 / 4))


def test_kl_decomposition_sums_to_the_sampled_kl_and_tc_is_zero_for_independent_dimensions():
    torch.manual_seed(1)
    mean, logvar = torch.randn(64, 3), torch.randn(64, 3) * 0.3
    z = reparameterize(mean, logvar)
    terms = decomposed_kl(z, mean, logvar)
    sampled_kl = (gaussian_log_density(z, mean, logvar).sum(1)
                  - gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z)).sum(1)).mean()
    assert float(terms["mi"] + terms["tc"] + terms["dwkl"]) == pytest.approx(float(sampled_kl), rel=1e-5)
    # posteriors that are all the prior: no information, no correlation, no KL
    prior = decomposed_kl(torch.randn(500, 2), torch.zeros(500, 2), torch.zeros(500, 2))
    for name in ("mi", "tc", "dwkl"):
        assert abs(float(prior[name])) < 1e-4, name
    # strongly correlated codes have a clearly positive total correlation
    shared = torch.randn(256, 1)
    correlated = decomposed_kl(shared.repeat(1, 2), shared.repeat(1, 2), torch.full((256, 2), -6.0))
    assert float(correlated["tc"]) > 1.0


def test_triplet_loss_cases():
    a = torch.tensor([[0.0, 0.0]])
    near, far = torch.tensor([[1.0, 0.0]]), torch.tensor([[4.0, 0.0]])
    assert float(triplet_loss(a, near, far)) == 0.0  # |a-p| - |a-n| + 1 = 1 - 4 + 1 < 0
    assert float(triplet_loss(a, far, near)) == pytest.approx(4.0)  # 4 - 1 + 1
    assert float(triplet_loss(a, near, near)) == pytest.approx(1.0)  # the margin alone


def test_session_triplets_pair_frames_within_and_across_sessions():
    latents = torch.arange(12.0).view(6, 2)
    sessions = torch.tensor([0, 0, 0, 1, 1, 1])
    anchor, positive, negative = session_triplets(latents, sessions, torch.Generator().manual_seed(0))
    index = {tuple(row.tolist()): i for i, row in enumerate(latents)}
    for a, p, n in zip(anchor, positive, negative):
        ia, ip, in_ = index[tuple(a.tolist())], index[tuple(p.tolist())], index[tuple(n.tolist())]
        assert sessions[ia] == sessions[ip] and ia != ip and sessions[ia] != sessions[in_]
    assert session_triplets(latents, torch.zeros(6, dtype=torch.long)) is None


def test_label_masks_nan_and_masked_entries():
    labels = torch.tensor([[1.0, float("nan")], [2.0, 3.0]])
    masks = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert label_mask(labels, masks).tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert label_mask(labels, None).tolist() == [[1.0, 0.0], [1.0, 1.0]]


def test_r2_and_latent_correlation():
    target = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    ones = torch.ones_like(target)
    assert float(r2_score(target, target, ones)) == 1.0
    assert float(r2_score(torch.full_like(target, 1.5), target, ones)) == pytest.approx(0.0)
    x = torch.randn(1000, 1)
    assert float(mean_abs_correlation(torch.cat([x, -x], 1))) == pytest.approx(1.0)
    assert float(mean_abs_correlation(torch.randn(5000, 3))) < 0.05


def test_annealing_reaches_the_configured_weight_and_evaluation_uses_it():
    assert [anneal(4.0, 4, e, True) for e in range(6)] == [1.0, 2.0, 3.0, 4.0, 4.0, 4.0]
    assert anneal(4.0, 4, 0, False) == 4.0  # BehaveNet's schedule ended at 1, not at the weight


@torch.no_grad()
def test_each_class_loss_is_its_terms_combined():
    torch.manual_seed(0)
    batch = {"images": torch.rand(8, 1, 16, 16), "labels": torch.randn(8, 2)}
    common = dict(y_pixels=16, x_pixels=16, n_labels=2, n_ae_latents=5)
    vae = build_model(VAEConfig(model_class="vae", **common, vae_beta=3.0)).eval()
    torch.manual_seed(1)
    t = {k: v.detach() for k, v in vae.loss_terms(batch).items()}
    assert float(t["loss"]) == pytest.approx(float(t["frame_nll"] + 3.0 * t["kl"]), rel=1e-6)
    tc = build_model(BetaTCVAEConfig(model_class="beta-tcvae", **common, beta_tcvae_beta=5.0)).eval()
    t = tc.loss_terms(batch)
    assert float(t["loss"]) == pytest.approx(float(t["frame_nll"] + t["mi"] + 5.0 * t["tc"] + t["dwkl"]), rel=1e-6)
    msp = build_model(MSPConfig(model_class="cond-ae-msp", **common, msp_alpha=2.0)).eval()
    t = msp.loss_terms(batch)
    assert float(t["loss"]) == pytest.approx(float(t["pixel_mse"] + 2.0 * (t["label_mse"] + t["msp_subspace"])))
    basis = msp.subspace_basis()
    assert np.allclose(basis @ basis.T, np.eye(5), atol=1e-8)
    ps = build_model(PSVAEConfig(model_class="ps-vae", **common, ps_vae_alpha=10.0, ps_vae_beta=4.0)).eval()
    t = ps.loss_terms(batch)
    expected = (t["frame_nll"] + 10.0 * t["label_nll"] + t["kl_supervised"] + t["mi"] + 4.0 * t["tc"] + t["dwkl"])
    assert float(t["loss"]) == pytest.approx(float(expected), rel=1e-6)
    msps = build_model(MSPSVAEConfig(model_class="msps-vae", **common, n_background=1, n_sessions_per_batch=2,
                                     n_sessions=2, ps_vae_delta=7.0)).eval()
    mixed = {**batch, "session": torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])}
    t = msps.loss_terms(mixed)
    assert "triplet" in t and "triplet" not in msps.loss_terms(batch)
    assert msps.latent_groups() == {"supervised": slice(0, 2), "background": slice(2, 3), "unsupervised": slice(3, None)}


def test_conditional_decoders_read_the_labels_and_labels_images_has_no_encoder():
    common = dict(y_pixels=16, x_pixels=16, n_labels=3, n_ae_latents=4)
    cond = build_model(LabelReadingConfig(model_class="cond-ae", **common)).eval()
    images = torch.rand(2, 1, 16, 16)
    latents = cond.encode(images)
    a = cond.decode(latents, labels=torch.zeros(2, 3))
    b = cond.decode(latents, labels=torch.ones(2, 3))
    assert not torch.allclose(a, b)
    decoder_only = build_model(AEConfig(model_class="labels-images", **common))
    assert not hasattr(decoder_only.coder, "first_convs")
    assert decoder_only(images, labels=torch.zeros(2, 3))[0].shape == images.shape


def test_session_specific_layers_differ_per_session():
    model = build_model(AEConfig(y_pixels=16, x_pixels=16, n_sessions=2, fit_sess_io_layers=True)).eval()
    images = torch.rand(4, 1, 16, 16)
    zero = model.encode(images, torch.zeros(4, dtype=torch.long))
    one = model.encode(images, torch.ones(4, dtype=torch.long))
    mixed = model.encode(images, torch.tensor([0, 1, 0, 1]))
    assert not torch.allclose(zero, one)
    assert torch.allclose(mixed[0::2], zero[0::2], atol=1e-6) and torch.allclose(mixed[1::2], one[1::2], atol=1e-6)
