"""Training frames moved by random shifts and rotations (bnet.training.augment)."""

import pytest
import torch

from bnet.errors import ConfigError
from bnet.training import Augmentation
from conftest import assert_clean_failure, run_cli


def blob_frames(n: int, y: float, x: float, size: tuple[int, int] = (32, 32)) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(size[0]) + 0.5, torch.arange(size[1]) + 0.5, indexing="ij")
    blob = torch.exp(-((rows - y) ** 2 + (cols - x) ** 2) / (2 * 1.5 ** 2))
    return blob.expand(n, 1, *size).clone()


def centroids(frames: torch.Tensor) -> torch.Tensor:
    """(n, 2) centroids (row, column) in pixel units."""
    rows, cols = torch.arange(frames.shape[-2]) + 0.5, torch.arange(frames.shape[-1]) + 0.5
    mass = frames.sum((1, 2, 3))
    return torch.stack([(frames.sum((1, 3)) * rows).sum(1) / mass, (frames.sum((1, 2)) * cols).sum(1) / mass], 1)


def test_shifts_stay_within_their_pixels_and_cover_them():
    frames = blob_frames(400, 16, 16)
    augment = Augmentation(shift=3)
    moved = augment({"images": frames}, augment.generator(torch.device("cpu")))["images"]
    offsets = centroids(moved) - 16
    assert offsets.abs().max() <= 3 + 1e-3
    assert offsets.abs().max() > 2.8  # the whole range is drawn, not a sliver of it
    assert torch.allclose(moved.sum((1, 2, 3)), frames.sum((1, 2, 3)), rtol=1e-3)  # the animal is moved, not cut


@pytest.mark.parametrize("width", [32, 48])
def test_rotations_turn_about_the_centre_within_their_angle(width):
    frames = blob_frames(400, 8, width / 2, size=(32, width))  # 8 px above the centre
    augment = Augmentation(rotation=20)
    moved = augment({"images": frames}, augment.generator(torch.device("cpu")))["images"]
    row, col = (centroids(moved) - torch.tensor([16, width / 2])).T
    radius, angle = torch.hypot(row, col), torch.rad2deg(torch.atan2(col, -row))
    assert torch.allclose(radius, torch.full_like(radius, 8.0), atol=0.05)
    assert angle.abs().max() <= 20 + 0.5 and angle.abs().max() > 18


def test_masks_move_with_their_frames_and_the_draws_repeat_with_the_seed():
    frames = torch.rand(6, 1, 16, 16)
    batch = {"images": frames, "masks": frames.clone(), "session": torch.zeros(6, dtype=torch.long)}
    augment = Augmentation(shift=2, rotation=10, seed=4)
    first = augment(batch, augment.generator(torch.device("cpu")))
    again = augment(batch, augment.generator(torch.device("cpu")))
    assert torch.equal(first["images"], first["masks"]) and not torch.equal(first["images"], frames)
    assert torch.equal(first["images"], again["images"]) and first["session"] is batch["session"]


def test_negative_moves_are_refused():
    with pytest.raises(ConfigError, match="non-negative"):
        Augmentation(shift=-1)


def test_a_class_that_reads_labels_refuses_to_be_moved(tmp_path, tiny_session):
    config = tmp_path / "c.yaml"
    config.write_text("model: {model_class: cond-ae, n_ae_latents: 4}\ntraining: {augment_shift: 2}\n")
    result = run_cli("tune", "ae", "--data", tiny_session, "--config", config, "--store", tmp_path / "s",
                     "--experiment", "e")
    assert_clean_failure(result, "augment_shift 2 would move the frames but not the labels model_class 'cond-ae' reads",
                         store=tmp_path / "s")
