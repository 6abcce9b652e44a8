import math

import pytest
import torch

from bnet.errors import BnetError, ConfigError
from bnet.models import build_model, load_checkpoint, model_classes, read_checkpoint, save_checkpoint
from bnet.models.ae import AEConfig, masked_mse, same_padding


@pytest.mark.parametrize("pixels, n_params", [(128, 8_758_285), (64, 8_719_885)])
def test_default_conv_ae_matches_behavenet_parameter_count(pixels, n_params):
    """BehaveNet's layers, plus bnet's per-pixel output offset (one per pixel)."""
    model = build_model(AEConfig(y_pixels=pixels, x_pixels=pixels, n_ae_latents=12))
    offset = model.coder.frame_logits.numel()
    assert offset == pixels * pixels
    assert sum(p.numel() for p in model.parameters()) - offset == n_params


def test_a_checkpoint_from_before_the_output_offset_loads_without_one(tmp_path):
    model = build_model(AEConfig(y_pixels=16, x_pixels=16, n_ae_latents=3))
    model.start_at_mean_frame(torch.full((1, 1, 16, 16), 0.2))
    images = torch.rand(2, 1, 16, 16)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("frame_logits")}
    old = build_model(AEConfig(y_pixels=16, x_pixels=16, n_ae_latents=3))
    old.load_state_dict(state)
    assert torch.equal(old.coder.frame_logits, torch.zeros_like(old.coder.frame_logits))
    with torch.no_grad():
        model.coder.frame_logits.zero_()
        torch.testing.assert_close(old(images)[0], model(images)[0])


def test_a_fit_starts_at_the_mean_frame():
    model = build_model(AEConfig(y_pixels=16, x_pixels=16, n_ae_latents=3))
    with torch.no_grad():
        for layer in (model.coder.from_latents, *model.coder.decoder_convs, *model.coder.last_convs):
            layer.weight.zero_()
    mean = torch.rand(1, 1, 16, 16) * 0.9 + 0.05
    model.start_at_mean_frame(mean)
    with torch.no_grad():
        torch.testing.assert_close(model.decode(torch.zeros(1, 3)), mean, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(1, 16, 16), (2, 40, 24), (3, 33, 17)])
def test_conv_ae_reconstructs_any_frame_shape(shape):
    model = build_model(AEConfig(n_input_channels=shape[0], y_pixels=shape[1], x_pixels=shape[2], n_ae_latents=5))
    images = torch.rand(4, *shape)
    with torch.no_grad():
        reconstruction, latents = model(images)
    assert reconstruction.shape == images.shape and latents.shape == (4, 5)
    assert float(reconstruction.min()) >= 0 and float(reconstruction.max()) <= 1  # sigmoid output


@pytest.mark.parametrize("pixels", [64, 40])
def test_patch_gemm_layers_equal_torch_conv_kernels(pixels):
    model = build_model(AEConfig(y_pixels=pixels, x_pixels=pixels, n_ae_latents=6, rng_seed_model=2))
    images = torch.rand(3, 1, pixels, pixels)
    with torch.no_grad():
        fast = model(images)
        model.coder.patch_gemm = False
        stock = model(images)
    assert torch.allclose(fast[1], stock[1], atol=1e-5) and torch.allclose(fast[0], stock[0], atol=1e-5)


def test_same_padding_matches_tensorflow():
    assert same_padding(128, 2, 5) == (64, 1, 2)
    assert same_padding(8, 5, 5) == (2, 1, 1)
    assert same_padding(4, 5, 5) == (1, 0, 1)


def test_transposed_decoder_is_adjoint_of_encoder_layer():
    # <conv(x), y> == <x, conv_T(y)> for the padding/cropping pair the AE uses
    model = build_model(AEConfig(y_pixels=20, x_pixels=20, rng_seed_model=1))
    coder = model.coder
    conv, deconv = coder.first_convs[0], coder.last_convs[0]
    deconv.weight.data = conv.weight.data.clone()
    x = torch.randn(1, 1, 20, 20)
    out_y, out_x = coder.sizes[1]
    y = torch.randn(1, 32, out_y, out_x)
    forward = torch.nn.functional.conv2d(torch.nn.functional.pad(x, coder.pads[0]), conv.weight, stride=2)
    left, _, top, _ = coder.pads[0]
    adjoint = torch.nn.functional.conv_transpose2d(y, deconv.weight, stride=2)[:, :, top:top + 20, left:left + 20]
    assert torch.allclose((forward * y).sum(), (x * adjoint).sum(), rtol=1e-4)


def test_linear_ae_and_seeded_initialisation():
    a = build_model(AEConfig(model_type="linear", y_pixels=8, x_pixels=8, n_ae_latents=3, rng_seed_model=7))
    b = build_model(AEConfig(model_type="linear", y_pixels=8, x_pixels=8, n_ae_latents=3, rng_seed_model=7))
    c = build_model(AEConfig(model_type="linear", y_pixels=8, x_pixels=8, n_ae_latents=3, rng_seed_model=8))
    assert torch.equal(a.coder.encoders[0].weight, b.coder.encoders[0].weight)
    assert not torch.equal(a.coder.encoders[0].weight, c.coder.encoders[0].weight)
    assert a(torch.rand(2, 1, 8, 8))[0].shape == (2, 1, 8, 8)


def test_masked_mse_ignores_masked_pixels():
    target = torch.zeros(2, 1, 4, 4)
    reconstruction = torch.ones(2, 1, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2] = 1
    reconstruction[:, :, 2:] = 100.0  # huge errors where the mask is 0
    assert math.isclose(float(masked_mse(reconstruction, target, mask)), 1.0)
    assert float(masked_mse(reconstruction, target, None)) > 1000


def test_registry_names_unknown_classes_and_types():
    assert "ae" in model_classes("ae")
    with pytest.raises(ConfigError, match="unknown model_class 'vae-x'"):
        build_model(AEConfig(model_class="vae-x"))
    with pytest.raises(ConfigError, match="model_type 'rnn'"):
        build_model(AEConfig(model_type="rnn"))


def test_checkpoint_round_trip_without_pickled_code(tmp_path):
    model = build_model(AEConfig(y_pixels=16, x_pixels=16, n_ae_latents=4, rng_seed_model=3))
    path = save_checkpoint(tmp_path / "model.pt", model, {"best_epoch": 2})
    # the file is plain tensors and primitives: the safe loader reads it
    content = torch.load(path, weights_only=True)
    assert content["model_config"]["n_ae_latents"] == 4
    restored = load_checkpoint(path)
    images = torch.rand(3, 1, 16, 16)
    assert torch.allclose(restored(images)[0], model.eval()(images)[0])
    assert restored.checkpoint_metadata == {"best_epoch": 2}


def test_foreign_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(BnetError, match="not a bnet checkpoint"):
        read_checkpoint(path)
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(BnetError, match="junk.pt: not a bnet checkpoint"):
        read_checkpoint(tmp_path / "junk.pt")
