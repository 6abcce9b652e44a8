"""One identity for a fit, and one fingerprint for a study.

Two trials are the same fit when they fit the same family to the same data (digest), from
the same upstream runs and behaviour target, with the same resolved hyperparameters: the
split (seed and fractions), the expanded architecture, the model class, the noise model,
the neuron subset. The machinery that does not change the fitted model (where the data
lives, which device, what is exported) is left out; each family declares its own
(:attr:`bnet.tuning.family.Family.machinery`).

The :class:`FitIdentity` is computed once per trial and tagged on its run
(``bnet.config_hash``); "never refit the same configuration" looks it up. The study's
:func:`fingerprint` is the same idea one level up: what must not change when a study
resumes (its data, upstream runs, fixed values with the architecture expanded, and its
search space).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bnet.tracking import conventions as tags

if TYPE_CHECKING:
    from bnet.tuning.family import Family, PreparedStudy
    from bnet.tuning.space import SearchSpace


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:20]


def fitted(family: "Family", values: dict[str, Any]) -> dict[str, str]:
    """``values`` without the family's machinery, as text (how they are logged)."""
    return {k: str(v) for k, v in sorted(values.items()) if k not in family.machinery}


@dataclass(frozen=True)
class FitIdentity:
    """What makes a fit the fit it is.

    Attributes:
        family: the model family.
        data_hash: the digest of the session file(s).
        subject: the study's run tags: upstream run ids, behaviour target and its kind,
            neuron subset.
        params: every fitted hyperparameter as resolved for the trial (text).
    """

    family: str
    data_hash: str
    subject: dict[str, str]
    params: dict[str, str]

    @classmethod
    def of(cls, family: "Family", prepared: "PreparedStudy", params: dict[str, Any]) -> "FitIdentity":
        return cls(family.name, prepared.session.data_hash, dict(sorted(prepared.run_tags.items())),
                   fitted(family, params))

    def digest(self) -> str:
        """The identity as a short hash (the run tag ``bnet.config_hash``)."""
        return _digest({"family": self.family, "data_hash": self.data_hash, "tags": self.subject,
                        "params": self.params})


def fingerprint(family: "Family", prepared: "PreparedStudy", objective_metrics: tuple[str, ...],
                fixed: dict[str, Any], space: "SearchSpace") -> dict[str, Any]:
    """What must not change when a study resumes: a changed fixed value or a changed search
    dimension would mix two searches in one study (and Optuna refuses a categorical
    dimension whose choices changed, inside the trial)."""
    return {"family": family.name, "objective": ",".join(objective_metrics),
            "data_hash": prepared.session.data_hash,
            "upstream": {k: v for k, v in prepared.run_tags.items() if k.startswith(tags.UPSTREAM_TAG_PREFIX)},
            "fixed": fitted(family, family.expand_fixed(fixed)),
            "space": dict(sorted(space.describe().items()))}


def differences(recorded: dict[str, Any], wanted: dict[str, Any]) -> str:
    """What differs between a study's recorded fingerprint and this command's, in words."""
    found = []
    if recorded.get("family") != wanted["family"] or recorded.get("objective") != wanted["objective"]:
        found.append(f"it is a {recorded.get('family')} study of {recorded.get('objective')}, "
                     f"not {wanted['family']} of {wanted['objective']}")
    if recorded.get("data_hash") != wanted["data_hash"]:
        found.append(f"it was started on other data (data hash {recorded.get('data_hash')}, "
                     f"this file {wanted['data_hash']})")
    for key in sorted(set(recorded.get("upstream", {})) | set(wanted["upstream"])):
        before, now = recorded.get("upstream", {}).get(key), wanted["upstream"].get(key)
        if before != now:
            found.append(f"{key} was {before}, now {now}")
    for part, what, unset in (("fixed", "fixed hyperparameters differ", "(searched or unset)"),
                              ("space", "the search space differs", "(not searched)")):
        if part not in recorded:
            continue  # recorded before bnet fingerprinted it
        before, now = recorded[part], wanted[part]
        changed = [f"{k} {before.get(k, unset)} -> {now.get(k, unset)}"
                   for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
        if changed:
            found.append(f"{what}: " + ", ".join(changed))
    return "; ".join(found)
