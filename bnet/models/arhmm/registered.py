"""The ARHMM engine as the model registry builds it: ``hmm``, ``arhmm``, ``arhmm-labels``.

The registry needs a config with a ``model_class`` and a model with ``state_dict`` /
``load_state_dict``; this wraps :class:`ARHMM` in that shape so checkpoints, the registry
and ``bnet.load_model`` treat segmentation models like every other model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Mapping

import torch

from bnet.models.arhmm.config import ARHMMConfig, ARHMMConfigError
from bnet.models.arhmm.model import ARHMM
from bnet.models.registry import register


@dataclass
class SegmentationConfig:
    """``model_class`` plus the engine's hyperparameters (see :class:`ARHMMConfig`).

    ``hmm`` is an ARHMM with ``n_arhmm_lags = 0``; ``arhmm-labels`` is an ARHMM fitted to
    labels instead of AE latents.
    """

    model_class: str = "arhmm"
    n_arhmm_states: int = 8
    n_arhmm_lags: int = 1
    noise_type: str = "gaussian"
    transitions: str = "stationary"
    kappa: float = 0.0
    alpha: float = 1.0
    n_iters: int = 150
    arhmm_es_tol: float = 0.0
    rng_seed_model: int = 0
    dtype: str | None = None
    device: str = "cpu"

    def engine_config(self) -> ARHMMConfig:
        if self.model_class == "hmm" and self.n_arhmm_lags != 0:
            raise ARHMMConfigError(f"model_class 'hmm' has no AR dynamics: n_arhmm_lags must be 0, got {self.n_arhmm_lags}")
        names = {f.name for f in fields(ARHMMConfig)}
        return ARHMMConfig(**{k: v for k, v in asdict(self).items() if k in names})

    def validate(self) -> None:
        self.engine_config()


class SegmentationModel:
    """An ARHMM with the registry's interface (``config``, ``state_dict``, ``load_state_dict``)."""

    def __init__(self, config: SegmentationConfig):
        self.config = config
        self.engine = ARHMM(config.engine_config())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.engine.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.engine = ARHMM.from_state_dict(self.engine.config, state)

    def eval(self) -> "SegmentationModel":
        return self


for _model_class in ("arhmm", "hmm", "arhmm-labels"):
    register(_model_class, family="arhmm", config_type=SegmentationConfig)(SegmentationModel)
