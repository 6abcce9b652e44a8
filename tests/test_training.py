import math

import numpy as np
import pytest
import torch

from bnet.data import TrialBatches, open_session, split_trials
from bnet.errors import ConfigError
from bnet.models import build_model
from bnet.models.ae import AEConfig
from bnet.models.decoders import DecoderConfig
from bnet.training import (
    Augmentation, OnEpochEnd, TrainingConfig, TrainingState, evaluate, fit, resolve_device, resolve_precision,
)
from bnet.training.loop import improves


@pytest.fixture(scope="module")
def batches(tiny_session):
    session = open_session(tiny_session)
    splits = split_trials(session.trials, "8;1;1;0")
    return {name: TrialBatches(session, splits[name]) for name in ("train", "val", "test")}


def linear_ae(seed=0):
    return build_model(AEConfig(model_type="linear", y_pixels=16, x_pixels=16, n_ae_latents=3, rng_seed_model=seed))


def test_fit_learns_and_restores_best_val_weights(batches):
    model = linear_ae()
    before = evaluate(model, batches["val"], torch.device("cpu"))
    result = fit(model, batches["train"], batches["val"],
                 TrainingConfig(learning_rate=1e-3, max_n_epochs=6, enable_early_stop=False))
    assert len(result.history) == 6
    assert result.best_val_loss < before
    assert result.best_val_loss == min(r.val_loss for r in result.history)
    # the model holds the best epoch's weights, not the last epoch's
    assert evaluate(model, batches["val"], torch.device("cpu")) == pytest.approx(result.best_val_loss, rel=1e-5)


def test_best_weights_are_kept_when_training_diverges(batches):
    model = linear_ae()

    class Sabotage:
        def on_epoch_end(self, record):
            if record.epoch == 1:  # ruin the weights after epoch 1 was validated
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(torch.randn_like(p) * 5)

    result = fit(model, batches["train"], batches["val"],
                 TrainingConfig(learning_rate=1e-3, max_n_epochs=4, enable_early_stop=False),
                 callbacks=[Sabotage()])
    assert result.best_epoch <= 1
    assert evaluate(model, batches["val"], torch.device("cpu")) == pytest.approx(result.best_val_loss, rel=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_early_stopping_respects_patience_and_min_epochs(batches, precision):
    """At learning rate 1e-9 the weights creep at rounding level and the val loss "improves"
    by ~1e-7 relative every epoch or two (in bf16 on an AMX Xeon: in every one of 50
    epochs); below ``early_stop_min_delta`` that resets no patience, so both precisions
    stop at the first epoch allowed."""
    config = TrainingConfig(learning_rate=1e-9, max_n_epochs=50, min_n_epochs=8, early_stop_history=2)
    result = fit(linear_ae(), batches["train"], batches["val"], config, precision=precision)
    assert result.precision == precision
    assert result.stopped_early and len(result.history) == 8
    # the tiny gains still pick the best weights
    assert result.best_val_loss == min(r.val_loss for r in result.history)


def test_only_gains_above_the_relative_tolerance_reset_the_patience():
    assert improves(0.9, math.inf, 1e-5) and improves(1.0, math.inf, 0.5)
    assert improves(0.99, 1.0, 1e-5) and not improves(1.0 - 1e-6, 1.0, 1e-5)
    assert improves(-1.01, -1.0, 1e-5) and not improves(-1.0 - 1e-6, -1.0, 1e-5)  # NLLs may be negative
    assert improves(1.0 - 1e-6, 1.0, 0.0)  # 0: any gain, as before
    with pytest.raises(ConfigError, match="early_stop_min_delta"):
        TrainingConfig(early_stop_min_delta=-1e-3).validate()

    class Scripted(torch.nn.Module):
        """A model whose val loss per epoch is scripted: tiny gains, then a real one."""

        def __init__(self, losses):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.losses, self.calls = losses, 0

        def loss(self, batch):
            if self.training:
                return (self.w - 1.0) ** 2
            value = self.losses[min(self.calls, len(self.losses) - 1)]
            self.calls += 1
            return self.w * 0 + value

    one = [{"x": torch.zeros(1)}]
    creeping = [1.0, 1.0 - 1e-7, 1.0 - 2e-7, 1.0 - 3e-7, 1.0 - 4e-7, 1.0 - 5e-7]
    result = fit(Scripted(creeping), one, one, TrainingConfig(max_n_epochs=6, early_stop_history=3), precision="fp32")
    assert result.stopped_early and len(result.history) == 4 and result.best_epoch == 3
    # gains that add up past the tolerance reset it (cumulative, as Keras' min_delta)
    adding_up = [1.0, 1.0 - 6e-6, 1.0 - 1.2e-5, 1.0 - 1.3e-5, 1.0 - 1.4e-5, 1.0 - 1.5e-5, 1.0 - 1.6e-5]
    result = fit(Scripted(adding_up), one, one, TrainingConfig(max_n_epochs=7, early_stop_history=3),
                 precision="fp32")
    assert result.stopped_early and len(result.history) == 6 and result.best_epoch == 5


def test_seeds_make_fits_reproducible(batches):
    config = TrainingConfig(learning_rate=1e-3, max_n_epochs=2, rng_seed_train=4)
    a = fit(linear_ae(), batches["train"], batches["val"], config)
    b = fit(linear_ae(), batches["train"], batches["val"], config)
    c = fit(linear_ae(), batches["train"], batches["val"], TrainingConfig(learning_rate=1e-3, max_n_epochs=2, rng_seed_train=5))
    assert [r.train_loss for r in a.history] == [r.train_loss for r in b.history]
    assert [r.train_loss for r in a.history] != [r.train_loss for r in c.history]


@pytest.mark.parametrize("shift", [0.0, 2.0])
def test_a_fit_resumed_from_its_state_goes_on_as_if_never_stopped(batches, tmp_path, shift):
    """What a population-based member relies on: the state after an epoch, saved and loaded
    without pickled code, goes on to the very weights of the fit that never stopped."""
    config = TrainingConfig(learning_rate=1e-3, max_n_epochs=4, enable_early_stop=False, rng_seed_train=2)
    moves = Augmentation(shift, 0.0, seed=1)
    whole = linear_ae()
    states = []
    fit(whole, batches["train"], batches["val"], config, augmentation=moves,
        callbacks=[OnEpochEnd(lambda record: states.append(record.state()))])
    torch.save(states[1].as_dict(), tmp_path / "state.pt")
    state = TrainingState.from_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    resumed = linear_ae(seed=7)  # other starting weights: the state's replace them
    result = fit(resumed, batches["train"], batches["val"], config, augmentation=moves, resume=state)
    assert [r.epoch for r in result.history] == [0, 1, 2, 3]
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    # a member that takes another's state goes on with its own learning rate
    faster = fit(linear_ae(), batches["train"], batches["val"],
                 TrainingConfig(learning_rate=1e-2, max_n_epochs=3, enable_early_stop=False, rng_seed_train=2),
                 resume=state)
    assert faster.history[2].train_loss != result.history[2].train_loss


def test_a_raising_callback_stops_training_and_propagates(batches):
    class Stop(Exception):
        pass

    class Pruner:
        def on_epoch_end(self, record):
            if record.epoch == 1:
                raise Stop()

    with pytest.raises(Stop):
        fit(linear_ae(), batches["train"], batches["val"], TrainingConfig(max_n_epochs=5), callbacks=[Pruner()])


def test_bad_training_options():
    with pytest.raises(ConfigError, match="max_n_epochs"):
        TrainingConfig(max_n_epochs=0).validate()
    with pytest.raises(ConfigError, match="learning_rate"):
        TrainingConfig(learning_rate=-1).validate()
    with pytest.raises(ConfigError, match="device must be"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")
    assert resolve_device("auto").type in ("cpu", "cuda")


def test_bnet_precision_overrides_what_auto_resolves_to(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("BNET_PRECISION", "bf16")
    assert resolve_precision("auto", cpu) == "bf16"
    assert resolve_precision("fp32", cpu) == "fp32"  # an explicit choice stands
    monkeypatch.setenv("BNET_PRECISION", "FP32")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setenv("BNET_PRECISION", "auto")
    assert resolve_precision("auto", cpu) == "fp32"  # CPUs train in float32 (README: training precision)
    monkeypatch.setenv("BNET_PRECISION", "fp16")
    with pytest.raises(ConfigError, match="BNET_PRECISION"):
        resolve_precision("auto", cpu)


DECODERS = {  # every architecture and noise of the decoders: (model_class, model_type, noise_dist)
    "mlp-gaussian": ("neural-ae", "mlp", "gaussian"), "mlp-mv": ("neural-ae", "mlp-mv", "gaussian-full"),
    "mlp-categorical": ("neural-arhmm", "mlp", "categorical"), "mlp-poisson": ("ae-neural", "mlp", "poisson"),
    "lstm": ("neural-labels", "lstm", "gaussian"),
}


@pytest.mark.parametrize("name", list(DECODERS))
def test_decoders_train_alike_in_bf16_and_float32(name):
    """The decoder study trains in float32 always (``bnet.tuning.families.decoder``), but a decoder
    fitted in bf16 autocast must train as well: val losses within 1 % over 3 epochs
    (measured: within 0.05 %)."""
    model_class, model_type, noise = DECODERS[name]
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(300, 5, generator=generator)
    if noise == "categorical":
        targets = torch.randint(0, 3, (300,), generator=generator).float()
    elif noise == "poisson":
        targets = torch.poisson(torch.full((300, 3), 2.0), generator=generator)
    else:
        targets = inputs[:, :3] @ torch.randn(3, 3, generator=generator) + 0.1 * torch.randn(300, 3, generator=generator)
    trials = [{"inputs": inputs[i : i + 50], "targets": targets[i : i + 50]} for i in range(0, 300, 50)]
    losses = {}
    for precision in ("fp32", "bf16"):
        model = build_model(DecoderConfig(model_class=model_class, model_type=model_type, noise_dist=noise, n_input=5,
                                          n_output=3, n_hid_units=8, n_lags=0 if model_type == "lstm" else 2))
        result = fit(model, trials[:4], trials[4:], TrainingConfig(learning_rate=1e-2, max_n_epochs=3,
                                                                   enable_early_stop=False), precision=precision)
        assert result.precision == precision and all(p.dtype == torch.float32 for p in model.parameters())
        losses[precision] = [r.val_loss for r in result.history]
    assert np.allclose(losses["bf16"], losses["fp32"], rtol=0.01, atol=0), losses
