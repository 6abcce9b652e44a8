"""``bnet apply``: tuned models on new recordings (:mod:`bnet.apply.sessions`)."""

from bnet.apply.sessions import Applied, apply, apply_pipeline

__all__ = ["Applied", "apply", "apply_pipeline"]
