"""Random shifts and rotations of training frames: an AE trained on a few hundred frames of a
freely moving animal learns the frames by heart (86-89% of the training variance, about half
of the held-out variance); moving each training frame by a few pixels and degrees, as
keypoint-moseq and lightning-pose do with their crops, shows it the animal in the places and
headings it takes between those frames.

The frame and its mask move together; validation and test frames are never moved. Labels do
not move (they need not be positions in the frame), so classes that read labels are not
augmented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from bnet.errors import ConfigError

MOVED = ("images", "masks")
"""The batch entries that are frames (moved together, by the same transform per frame)."""


@dataclass(frozen=True)
class Augmentation:
    """Per training frame, a shift drawn uniformly within ``shift`` pixels along each axis and
    a rotation about the frame's centre within ``rotation`` degrees either way, resampled
    bilinearly with the border's pixels continued outwards (no black corners for the model
    to learn).

    Attributes:
        shift: the largest shift, in pixels (0: none).
        rotation: the largest rotation, in degrees (0: none).
        seed: seed of the draws (the training seed: a fit is reproducible).
    """

    shift: float = 0.0
    rotation: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.shift < 0 or self.rotation < 0:
            raise ConfigError(f"augment_shift and augment_rotation must be non-negative, got {self.shift} and "
                              f"{self.rotation}")

    @property
    def active(self) -> bool:
        return self.shift > 0 or self.rotation > 0

    def params(self) -> dict[str, float]:
        """The moves as the config keys that set them (logged as a run's params)."""
        return {"augment_shift": self.shift, "augment_rotation": self.rotation}

    def generator(self, device: torch.device) -> torch.Generator:
        return torch.Generator(device).manual_seed(self.seed)

    def __call__(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``batch`` with its frames (and masks) moved, one draw per frame."""
        images = batch["images"]
        n, _, height, width = images.shape
        draws = torch.rand((3, n), generator=generator, device=images.device) * 2 - 1
        angle = draws[0] * math.radians(self.rotation)
        # affine_grid's coordinates run from -1 to 1 across the frame (a pixel is 2 / size), so a
        # turn in pixels scales its cross terms by the aspect ratio
        shift_x, shift_y = draws[1] * (2 * self.shift / width), draws[2] * (2 * self.shift / height)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([cos, -sin * height / width, shift_x], 1),
                             torch.stack([sin * width / height, cos, shift_y], 1)], 1)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        moved = dict(batch)
        for name in MOVED:
            if name in batch:
                frames = batch[name]
                resampled = F.grid_sample(frames.float(), grid, padding_mode="border", align_corners=False)
                moved[name] = resampled.to(frames.dtype).contiguous(memory_format=torch.channels_last)
        return moved
