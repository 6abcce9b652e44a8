"""Checkpoints that load without running pickled code.

A checkpoint is a plain dict of tensors, strings and numbers: the model's state dict plus
the config that rebuilds it through the registry, read back with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from bnet.errors import BnetError
from bnet.models.registry import build_model, config_from_dict, model_entry

CHECKPOINT_FORMAT = 1


def save_checkpoint(path: str | Path, model: torch.nn.Module, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (which has a dataclass ``config``) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(
        {
            "bnet_checkpoint": CHECKPOINT_FORMAT,
            "family": model_entry(model.config.model_class).family,
            "model_config": asdict(model.config),
            "state_dict": state,
            "metadata": dict(metadata or {}),
        },
        path,
    )
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents, loaded with ``weights_only=True``."""
    try:
        content = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for foreign or damaged files
        raise BnetError(f"{path}: not a bnet checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(content, dict) or content.get("bnet_checkpoint") != CHECKPOINT_FORMAT:
        raise BnetError(f"{path}: not a bnet checkpoint (format {CHECKPOINT_FORMAT})")
    return content


def load_checkpoint(path: str | Path) -> torch.nn.Module:
    """Rebuild the model a checkpoint describes, in eval mode on the CPU."""
    content = read_checkpoint(path)
    # a model fitted on a GPU (an ARHMM's config records its device) loads on any machine
    values = {**content["model_config"], **({"device": "cpu"} if "device" in content["model_config"] else {})}
    model = build_model(config_from_dict(values))
    model.load_state_dict(content["state_dict"])
    model.checkpoint_metadata = content["metadata"]
    return model.eval()
