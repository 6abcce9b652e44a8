import pytest
import torch

from bnet.data import TrialBatches, open_session, split_trials
from bnet.errors import ConfigError
from bnet.models import build_model
from bnet.models.ae import AEConfig
from bnet.training import TrainingConfig, evaluate, fit, resolve_device


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


def test_early_stopping_respects_patience_and_min_epochs(batches):
    config = TrainingConfig(learning_rate=1e-9, max_n_epochs=50, min_n_epochs=8, early_stop_history=2)
    result = fit(linear_ae(), batches["train"], batches["val"], config)
    assert result.stopped_early and 8 <= len(result.history) < 50


def test_seeds_make_fits_reproducible(batches):
    config = TrainingConfig(learning_rate=1e-3, max_n_epochs=2, rng_seed_train=4)
    a = fit(linear_ae(), batches["train"], batches["val"], config)
    b = fit(linear_ae(), batches["train"], batches["val"], config)
    c = fit(linear_ae(), batches["train"], batches["val"], TrainingConfig(learning_rate=1e-3, max_n_epochs=2, rng_seed_train=5))
    assert [r.train_loss for r in a.history] == [r.train_loss for r in b.history]
    assert [r.train_loss for r in a.history] != [r.train_loss for r in c.history]


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
