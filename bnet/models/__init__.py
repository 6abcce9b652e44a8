"""Models built by name from a registry; checkpoints that load without pickled code."""

from bnet.models.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from bnet.models.registry import build_model, config_from_dict, model_classes, model_entry, register

__all__ = [
    "build_model", "config_from_dict", "load_checkpoint", "model_classes", "model_entry",
    "read_checkpoint", "register", "save_checkpoint",
]
