"""The ARHMM engine as the model registry builds it: ``hmm``, ``arhmm``, ``hmm-labels``, ``arhmm-labels``.

The registry needs a config with a ``model_class`` and a model with ``state_dict`` /
``load_state_dict``; this wraps :class:`ARHMM` in that shape so checkpoints, the registry
and ``bnet.load_model`` treat segmentation models like every other model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from bnet.models.arhmm.config import ARHMMConfig, ARHMMConfigError
from bnet.models.arhmm.model import ARHMM
from bnet.models.registry import register


HMM_CLASSES = ("hmm", "hmm-labels")
"""Classes without autoregressive dynamics (``n_arhmm_lags`` is 0)."""
LABEL_CLASSES = ("hmm-labels", "arhmm-labels")
"""Classes fitted to a session's labels rather than to AE latents."""


@dataclass(frozen=True)
class SegmentationConfig(ARHMMConfig):
    """The engine's hyperparameters (:class:`ARHMMConfig`) plus the registry's ``model_class``.

    ``hmm`` is an ARHMM with ``n_arhmm_lags = 0``; the ``-labels`` classes are the same
    models fitted to labels instead of AE latents. ``n_arhmm_states`` defaults to
    BehaveNet's 8 here.
    """

    n_arhmm_states: int = 8
    model_class: str = "arhmm"

    def __post_init__(self):
        if self.model_class in HMM_CLASSES and self.n_arhmm_lags != 0:
            raise ARHMMConfigError(f"model_class '{self.model_class}' has no AR dynamics: n_arhmm_lags must be 0, "
                                   f"got {self.n_arhmm_lags}")
        super().__post_init__()


class SegmentationModel:
    """An ARHMM with the registry's interface (``config``, ``state_dict``, ``load_state_dict``)."""

    def __init__(self, config: SegmentationConfig):
        self.config = config
        self.engine = ARHMM(config)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.engine.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.engine = ARHMM.from_state_dict(self.engine.config, state)

    def eval(self) -> "SegmentationModel":
        return self


for _model_class in ("arhmm", "arhmm-labels", *HMM_CLASSES):
    register(_model_class, family="arhmm", config_type=SegmentationConfig)(SegmentationModel)
