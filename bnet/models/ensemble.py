"""Top-N ensembles as one loadable model: members rebuilt from their configs, predictions averaged.

Averaging is over ``predict``: means for continuous targets, probabilities for states,
rates for counts. The checkpoint holds every member's config and weights, so
``bnet.load_model`` on an ensemble run returns an object that predicts like one decoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from bnet.config import FILLED
from bnet.models.registry import build_model, config_from_dict, register


@dataclass
class EnsembleConfig:
    """Attributes:
        model_class: ``ensemble``.
        members: the member models' configs (plain dicts, best member first).
        member_run_ids: the runs the members come from.
    """

    model_class: str = "ensemble"
    members: list = field(default_factory=list, metadata=FILLED)
    member_run_ids: list = field(default_factory=list, metadata=FILLED)


@register("ensemble", family="ensemble", config_type=EnsembleConfig)
class EnsembleModel(nn.Module):
    def __init__(self, config: EnsembleConfig):
        super().__init__()
        self.config = config
        self.members = nn.ModuleList(build_model(config_from_dict(c)) for c in config.members)

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.stack([member.predict(inputs) for member in self.members]).mean(0)
