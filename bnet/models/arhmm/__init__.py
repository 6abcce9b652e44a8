"""Autoregressive hidden Markov models (ARHMMs) in PyTorch, batched and fitted by exact EM.

Numerically matches ssm (github.com/lindermanlab/ssm), the library BehaveNet fits its
ARHMMs with: the same model conventions (the first ``n_arhmm_lags`` frames scored by N(0, I),
sticky Dirichlet prior, MAP covariances, ssm's Student-t updates, gradient M-steps for
recurrent transitions), so likelihoods, posteriors and EM traces agree with it.
"""

from bnet.models.arhmm.batch import ARHMMDataError, SequenceBatch
from bnet.models.arhmm.config import NOISE_TYPES, TRANSITIONS, ARHMMConfig, ARHMMConfigError
from bnet.models.arhmm.model import ARHMM, ARHMMParameters, FitCallback, FitHistory, Posterior

__all__ = [
    "ARHMM", "ARHMMConfig", "ARHMMConfigError", "ARHMMDataError", "ARHMMParameters", "FitCallback",
    "FitHistory", "NOISE_TYPES", "Posterior", "SequenceBatch", "TRANSITIONS",
]
