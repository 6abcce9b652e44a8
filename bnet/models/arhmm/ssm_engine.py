"""Fitting with the Linderman lab's ``ssm`` instead of bnet's engine (``engine: ssm``).

``ssm`` is not a dependency (PyPI's 2019 snapshot does not import on Python 3.11; the
maintained code needs a manual build from GitHub), so it is imported only when asked for.
ssm fits; its parameters then move into an :class:`ARHMM`, so scoring, Viterbi, exports and
checkpoints are the same for both engines (and agree with ssm to ~1e-12, see the tests).
"""

from __future__ import annotations

from types import ModuleType
from typing import Sequence

import numpy as np

from bnet.errors import ConfigError
from bnet.models.arhmm.config import ARHMMConfig
from bnet.models.arhmm.model import ARHMM

AR_OBSERVATIONS = {"gaussian": "ar", "diagonal_gaussian": "diagonal_ar",
                   "studentst": "robust_ar", "diagonal_studentst": "diagonal_robust_ar"}
SSM_TRANSITIONS = {"stationary": "standard", "sticky": "sticky", "recurrent": "recurrent",
                   "recurrent_only": "recurrent_only"}


def import_ssm() -> ModuleType:
    """The ``ssm`` module, or a clear error saying why it cannot be used."""
    try:
        import ssm
    except Exception as err:  # an old ssm fails with errors of many types on new Pythons
        raise ConfigError(
            f"engine 'ssm' asked for, but ssm cannot be imported here ({type(err).__name__}: {err}); "
            f"install lindermanlab/ssm from source, or use engine 'bnet' (it matches ssm to ~1e-12)"
        ) from None
    return ssm


def ssm_model_arguments(config: ARHMMConfig) -> dict:
    """The keyword arguments of ``ssm.HMM`` for a bnet ARHMM config."""
    if config.n_arhmm_lags == 0:
        raise ConfigError("engine 'ssm' is wired for AR observations; use engine 'bnet' for n_arhmm_lags = 0")
    arguments = {
        "observations": AR_OBSERVATIONS[config.noise_type],
        "observation_kwargs": {"lags": config.n_arhmm_lags},
        "transitions": SSM_TRANSITIONS[config.transitions],
    }
    if config.transitions == "sticky":
        arguments["transition_kwargs"] = {"kappa": config.kappa, "alpha": config.alpha}
    return arguments


def parameters_from_ssm(config: ARHMMConfig, hmm) -> ARHMM:
    """An :class:`ARHMM` holding a fitted ``ssm.HMM``'s parameters."""
    observations, transitions = hmm.observations, hmm.transitions
    arrays = {"log_pi0": hmm.init_state_distn.log_pi0, "As": observations.As, "bs": observations.bs,
              "Sigmas": observations.Sigmas}
    for name in ("log_Ps", "Rs", "r"):
        if hasattr(transitions, name):
            arrays[name] = getattr(transitions, name)
    if config.is_studentst:
        arrays["nus"] = observations.nus
    return ARHMM.from_ssm(config, {k: np.asarray(v) for k, v in arrays.items()})


def fit_with_ssm(config: ARHMMConfig, train: Sequence[np.ndarray], n_iters: int) -> ARHMM:
    """Fit with ssm's own EM (and its own k-means initialisation)."""
    ssm = import_ssm()
    n_dims = train[0].shape[1]
    np.random.seed(config.rng_seed_model)  # ssm draws its initialisation from numpy's global state
    hmm = ssm.HMM(config.n_arhmm_states, n_dims, **ssm_model_arguments(config))
    hmm.fit([np.asarray(x, dtype=np.float64) for x in train], method="em", num_iters=n_iters, initialize=True)
    return parameters_from_ssm(config, hmm)
