"""Every model beside the trivial answer: the AE's frame variance explained against the mean
frame, the ARHMM's gain over one state, the decoders' constant predictions, and the plain
warning when the best model does not beat them."""

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from scipy.stats import multivariate_normal, poisson

from bnet.data.splits import TrialSplits
from bnet.models.arhmm.registered import SegmentationConfig
from bnet.models.frame_metrics import MOVING_VARIANCE_SHARE, MeanFrame
from bnet.tracking import resolve_store
from bnet.tuning import trivial
from bnet.tuning.families.arhmm import one_state_model
from bnet.tuning.families.decoder import DecodingData, score_predictions
from conftest import run_cli


class Reconstructs(torch.nn.Module):
    """A stand-in AE whose reconstruction is given: the frames plus noise, or a fixed image."""

    def __init__(self, noise: float = 0.0, image: torch.Tensor | None = None):
        super().__init__()
        self.noise, self.image = noise, image

    def posterior(self, batch):
        return batch["images"], None

    def reconstruct(self, batch, latents):
        if self.image is not None:
            return self.image.expand_as(latents)
        return latents + self.noise * torch.sin(torch.arange(latents.numel(), dtype=latents.dtype).reshape(latents.shape))


def batches_of(frames: np.ndarray, size: int = 7):
    return [{"images": torch.from_numpy(frames[i:i + size])} for i in range(0, len(frames), size)]


def test_variance_explained_is_one_minus_mse_over_the_training_mean_frames_mse():
    rng = np.random.default_rng(0)
    train = rng.random((40, 1, 6, 5))
    train[:, :, :, :2] = 0.3  # a static background: no variance, never a moving pixel
    held_out = rng.random((20, 1, 6, 5))
    held_out[:, :, :, :2] = 0.3
    baseline = MeanFrame.of(batches_of(train), n_sessions=1)
    np.testing.assert_allclose(baseline.mean[0], train.mean(0))
    variance = train.var(0)
    moving = variance >= MOVING_VARIANCE_SHARE * np.quantile(variance, 0.99)
    assert not moving[:, :, :2].any() and moving[:, :, 2:].all()
    np.testing.assert_array_equal(baseline.moving[0], moving)

    model = Reconstructs(noise=0.1)
    scores = baseline.score(model, batches_of(held_out), torch.device("cpu"))
    # the stand-in adds its noise per batch: rebuild it batch by batch, as score sees it
    reconstruction = np.concatenate([b["images"].numpy() + 0.1 * np.sin(np.arange(b["images"].numel())).reshape(
        b["images"].shape) for b in batches_of(held_out)])
    model_sse = ((held_out - reconstruction) ** 2).sum()
    mean_sse = ((held_out - train.mean(0)) ** 2).sum()
    where = np.broadcast_to(moving, held_out.shape)
    assert scores["var_explained"] == pytest.approx(1 - model_sse / mean_sse, rel=1e-12)
    assert scores["moving_var_explained"] == pytest.approx(
        1 - ((held_out - reconstruction) ** 2)[where].sum() / ((held_out - train.mean(0)) ** 2)[where].sum(), rel=1e-12)
    assert scores["mean_frame_mse"] == pytest.approx(mean_sse / held_out.size, rel=1e-12)
    assert scores["changed_pixel_share"] == pytest.approx((np.abs(held_out - train.mean(0)) > 0.05).mean())
    perfect = baseline.score(Reconstructs(), batches_of(held_out), torch.device("cpu"))
    assert perfect["var_explained"] == pytest.approx(1.0) and perfect["moving_var_explained"] == pytest.approx(1.0)
    # with masks (1 on the animal, 0.1 elsewhere, as bnet data build --masks writes them): the same over their pixels
    masks = np.where(rng.random(held_out.shape) < 0.3, 1.0, 0.1)
    with_masks = [{**b, "masks": torch.from_numpy(masks[i:i + 7])} for i, b in zip(range(0, 20, 7), batches_of(held_out))]
    on_animal = masks >= 0.5
    masked = baseline.score(model, with_masks, torch.device("cpu"))
    assert masked["masked_var_explained"] == pytest.approx(
        1 - ((held_out - reconstruction) ** 2)[on_animal].sum() / ((held_out - train.mean(0)) ** 2)[on_animal].sum(),
        rel=1e-12)
    assert "masked_var_explained" not in scores and masked["var_explained"] == pytest.approx(scores["var_explained"])


def test_each_session_is_measured_against_its_own_mean_frame():
    rng = np.random.default_rng(1)
    bright, dark = 0.8 + 0.1 * rng.random((10, 1, 4, 4)), 0.1 * rng.random((10, 1, 4, 4))
    batches = [{"images": torch.from_numpy(x), "session": torch.full((10,), s)} for s, x in enumerate((bright, dark))]
    baseline = MeanFrame.of(batches, n_sessions=2)
    np.testing.assert_allclose(baseline.mean[0], bright.mean(0))
    np.testing.assert_allclose(baseline.mean[1], dark.mean(0))
    # drawing each session's mean frame explains nothing of either
    image = torch.from_numpy(baseline.mean)

    class SessionMean(Reconstructs):
        def reconstruct(self, batch, latents):
            return image[batch["session"]]

    scores = baseline.score(SessionMean(), batches, torch.device("cpu"))
    assert scores["var_explained"] == pytest.approx(0.0, abs=1e-12)


def test_a_model_that_draws_the_mean_frame_is_warned_about():
    rng = np.random.default_rng(2)
    train, held_out = rng.random((30, 1, 5, 5)), rng.random((12, 1, 5, 5))
    baseline = MeanFrame.of(batches_of(train), n_sessions=1)
    scores = baseline.score(Reconstructs(image=torch.from_numpy(baseline.mean[0])), batches_of(held_out),
                            torch.device("cpu"))
    assert abs(scores["var_explained"]) < 0.1
    comparison = trivial.against_mean_frame({f"val_{k}": v for k, v in scores.items()})
    assert not comparison.beats
    said = comparison.sentence("the best model")
    assert said.startswith("warning: the best model explains") and "--track-animal" in said
    good = trivial.against_mean_frame({"val_var_explained": 0.62, "val_moving_var_explained": 0.7})
    assert good.beats and good.sentence("the best model") == (
        "the best model explains 62.0% of the held-out frame variance (70.0% on the moving pixels) beyond the "
        "training mean frame")
    assert trivial.against_mean_frame({"best_val_loss": 0.1}) is None  # runs from before the metric: nothing said


def test_an_animal_a_few_pixels_of_the_frame_is_warned_about_even_when_the_ae_beats_the_mean_frame():
    """The open-field mouse seen whole: 0.8% of a frame's pixels off the mean frame; an AE that
    explains 37% of that variance still holds little of its posture."""
    whole = trivial.against_mean_frame({"val_var_explained": 0.37, "val_moving_var_explained": 0.45,
                                "val_changed_pixel_share": 0.008})
    assert whole.beats and whole.warns
    said = whole.sentence("the best model")
    assert said.startswith("warning: the best model explains 37.0%") and "0.8% of their pixels" in said
    assert "--track-animal" in said
    # a window following the open-field mouse, its training frames moved: the wall carries the figure
    wall = trivial.against_mean_frame({"val_var_explained": 0.767, "val_changed_pixel_share": 0.2,
                                       "val_masked_var_explained": 0.068})
    assert wall.beats and wall.warns and "on the animal's (masked) pixels it explains 6.8%" in wall.sentence("it")
    assert not trivial.against_mean_frame({"val_var_explained": 0.54, "val_masked_var_explained": 0.144}).warns
    centred = trivial.against_mean_frame({"val_var_explained": 0.52, "val_changed_pixel_share": 0.2})
    assert centred.beats and not centred.warns and not centred.sentence("it").startswith("warning")


def test_the_one_state_model_is_ssms_map_gaussian():
    rng = np.random.default_rng(3)
    train = [rng.normal(size=(50, 2)) @ np.array([[1.0, 0.5], [0.0, 0.7]]) + [1.0, -2.0] for _ in range(4)]
    held_out = [rng.normal(size=(30, 2)) + [1.0, -2.0] for _ in range(2)]
    config = SegmentationConfig(n_arhmm_states=5, n_arhmm_lags=0, model_class="hmm", transitions="sticky",
                                kappa=100.0)
    engine = one_state_model(config, train)
    pooled = np.concatenate(train)
    # ssm's MAP covariance: the scatter plus its inverse-Wishart prior (Psi0 = 1e-4 I, nu0 = 1e-4)
    scatter = (pooled - pooled.mean(0)).T @ (pooled - pooled.mean(0))
    covariance = (scatter + 1e-4 * np.eye(2)) / (len(pooled) + 1e-4 + 2 + 1)
    expected = multivariate_normal(pooled.mean(0), covariance).logpdf(np.concatenate(held_out)).sum()
    assert engine.log_likelihood(held_out) == pytest.approx(expected, rel=1e-6)


def test_decoders_are_scored_beside_the_constant_prediction():
    rng = np.random.default_rng(4)
    splits = TrialSplits(train=(0, 1, 2), val=(3,), test=(4,))
    counts = {t: rng.poisson([1.0, 3.0], size=(20, 2)).astype(float) for t in range(5)}
    data = DecodingData(inputs={t: np.zeros((20, 1)) for t in range(5)}, targets=counts, splits=splits, kind="counts")
    rates = {t: np.full((20, 2), 2.0) for t in range(5)}
    scores = score_predictions(data, rates, "val", n_max_lags=2)
    train = np.concatenate([counts[t][2:-2] for t in (0, 1, 2)])
    expected = poisson(train.mean(0)).logpmf(counts[3][2:-2]).mean()
    assert scores["val_ll_constant"] == pytest.approx(expected, rel=1e-10)
    assert trivial.against_constant(scores).beats == (scores["val_ll"] > scores["val_ll_constant"])

    states = {t: rng.choice(3, size=20, p=[0.6, 0.3, 0.1]) for t in range(5)}
    data = DecodingData(inputs={t: np.zeros((20, 1)) for t in range(5)}, targets=states, splits=splits,
                        kind="categorical", n_classes=3)
    uniform = {t: np.full((20, 3), 1 / 3) for t in range(5)}
    scores = score_predictions(data, uniform, "val", n_max_lags=0)
    frequencies = (np.bincount(np.concatenate([states[t] for t in (0, 1, 2)]), minlength=3) + 1) / (60 + 3)
    assert scores["val_ll_constant"] == pytest.approx(np.log(frequencies[states[3]]).mean(), rel=1e-12)
    assert scores["val_accuracy_constant"] == pytest.approx(np.mean(states[3] == frequencies.argmax()))
    assert trivial.against_constant({"val_r2": -0.2}).sentence("the best model").startswith("warning:")


@pytest.mark.slow
def test_a_study_whose_best_ae_draws_the_mean_frame_says_so_everywhere(tmp_path, tiny_session):
    """Learning rate 1e-9: the AE stays where it started, worse than the mean frame; the summary,
    `bnet best`, the parent run's description and the report all say so."""
    store = tmp_path / "store"
    config = tmp_path / "still.yaml"
    config.write_text("training: {learning_rate: 1.0e-9, max_n_epochs: 1}\nmodel: {n_ae_latents: 2}\n"
                      "tuning: {n_trials: 1}\n")

    def run(*args):
        result = run_cli(*args)
        assert result.exit_code == 0, result.output + repr(result.exception)
        return result.output

    output = run("tune", "ae", "--data", tiny_session, "--experiment", "still", "--config", config, "--store", store)
    assert "warning: the best model explains" in output
    assert "warning: the best run explains" in run("best", "ae", "--experiment", "still", "--store", store)
    client = MlflowClient(resolve_store(store).tracking_uri)
    parent = client.search_runs([client.get_experiment_by_name("still").experiment_id],
                                "tags.`bnet.role` = 'study'")[0]
    assert "warning: The best model explains" in parent.data.tags["mlflow.note.content"]
    assert parent.data.tags["bnet.beats_trivial"] == "false"
    best = client.get_run(parent.data.tags["bnet.best_run_id"]).data.metrics
    assert best["val_var_explained"] < trivial.MIN_VAR_EXPLAINED
    assert {"train_var_explained", "test_var_explained", "val_moving_var_explained",
            "val_mean_frame_mse"} <= set(best)
    report = run("report", "still", "--out", tmp_path / "report.html", "--store", store)
    assert "warning: the best model explains" in report
    assert "warning: The best model explains" in (tmp_path / "report.html").read_text()
