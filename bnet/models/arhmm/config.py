"""Hyperparameters of an ARHMM, under BehaveNet's names."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch

from bnet.config import FILLED
from bnet.errors import ConfigError

NOISE_TYPES = ("gaussian", "diagonal_gaussian", "studentst", "diagonal_studentst")
TRANSITIONS = ("stationary", "sticky", "recurrent", "recurrent_only")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class ARHMMConfigError(ConfigError, ValueError):
    """An ARHMM hyperparameter that cannot be used; the message names the option."""


@dataclass(frozen=True)
class ARHMMConfig:
    """What model to build and how to fit it.

    Attributes:
        n_arhmm_states: K, the number of discrete states.
        n_arhmm_lags: AR order L; 0 gives a plain HMM (each state emits around a fixed mean).
            As in ssm, the first L frames of every sequence are scored by N(0, I) in every
            state and are not modelled by the AR dynamics.
        noise_type: ``gaussian`` (full covariance), ``diagonal_gaussian``, ``studentst``
            (multivariate t, full scale matrix) or ``diagonal_studentst`` (diagonal scale
            matrix, one degrees-of-freedom parameter per state shared by all dimensions).
        transitions: ``stationary``, ``sticky`` (stationary with a Dirichlet prior that
            favours self-transitions), ``recurrent`` (the next state also depends on the
            previous observation) or ``recurrent_only`` (it depends on the previous
            observation only).
        kappa: extra Dirichlet pseudo-count on self-transitions. It only acts on ``sticky``
            transitions; ``kappa > 0`` with any other transitions is rejected rather than
            silently ignored (BehaveNet users set ``transitions: sticky`` to use it).
        alpha: Dirichlet concentration of every transition row (``sticky`` only). It must be
            at least 1, so that the M-step stays a probability, and exactly 1 (no prior)
            for other transitions, for the same reason as ``kappa``.
        n_iters: EM iterations.
        arhmm_es_tol: stop EM early once the relative change of the training
            log-likelihood between iterations is at most this; 0 never stops early.
        rng_seed_model: seed of the k-means initialisation (and the default sampling seed).
        dtype: ``float32`` or ``float64``; None means float32. float32 EM is 1.7x faster on
            CPUs and ends at float64's held-out log-likelihood to ~1e-5 per step (README,
            "ARHMM engine"); float64 agrees with ssm to ~1e-12.
        device: a torch device string (``cpu``, ``cuda``, ``cuda:1``, ...).
    """

    n_arhmm_states: int
    n_arhmm_lags: int = 1
    noise_type: str = "gaussian"
    transitions: str = "stationary"
    kappa: float = 0.0
    alpha: float = 1.0
    n_iters: int = 150
    arhmm_es_tol: float = 0.0
    rng_seed_model: int = 0
    dtype: str | None = field(default=None, metadata=FILLED)  # the engine's choice (--engine)
    device: str = "cpu"

    def __post_init__(self):
        if not isinstance(self.n_arhmm_states, int) or self.n_arhmm_states < 1:
            raise ARHMMConfigError(f"n_arhmm_states must be a positive integer, got {self.n_arhmm_states!r}")
        if not isinstance(self.n_arhmm_lags, int) or self.n_arhmm_lags < 0:
            raise ARHMMConfigError(f"n_arhmm_lags must be a non-negative integer, got {self.n_arhmm_lags!r}")
        if self.noise_type not in NOISE_TYPES:
            raise ARHMMConfigError(
                f"noise_type must be one of {', '.join(NOISE_TYPES)}; got {self.noise_type!r}")
        if self.transitions not in TRANSITIONS:
            raise ARHMMConfigError(
                f"transitions must be one of {', '.join(TRANSITIONS)}; got {self.transitions!r}")
        if self.kappa < 0:
            raise ARHMMConfigError(f"kappa must be non-negative, got {self.kappa!r}")
        if self.transitions != "sticky" and self.kappa > 0:
            raise ARHMMConfigError(
                f"kappa={self.kappa} only acts on sticky transitions, but transitions="
                f"{self.transitions!r}: set transitions='sticky' or kappa=0")
        if self.transitions == "sticky" and self.alpha < 1:
            raise ARHMMConfigError(f"alpha must be at least 1 for sticky transitions, got {self.alpha!r}")
        if self.transitions != "sticky" and self.alpha != 1:
            raise ARHMMConfigError(
                f"alpha={self.alpha} only acts on sticky transitions, but transitions="
                f"{self.transitions!r}: set transitions='sticky' or alpha=1")
        if not isinstance(self.n_iters, int) or self.n_iters < 0:
            raise ARHMMConfigError(f"n_iters must be a non-negative integer, got {self.n_iters!r}")
        if self.arhmm_es_tol < 0:
            raise ARHMMConfigError(f"arhmm_es_tol must be non-negative, got {self.arhmm_es_tol!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ARHMMConfigError(f"dtype must be one of {', '.join(DTYPES)} or None; got {self.dtype!r}")
        try:
            torch.device(self.device)
        except RuntimeError as error:
            raise ARHMMConfigError(f"device {self.device!r} is not a torch device: {error}") from None

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype or "float32"]

    @property
    def is_studentst(self) -> bool:
        return self.noise_type in ("studentst", "diagonal_studentst")

    @property
    def is_diagonal(self) -> bool:
        return self.noise_type in ("diagonal_gaussian", "diagonal_studentst")

    @property
    def is_recurrent(self) -> bool:
        return self.transitions in ("recurrent", "recurrent_only")

    def to_dict(self) -> dict:
        """Plain values only, so a checkpoint holding it loads with ``weights_only=True``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ARHMMConfig:
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ARHMMConfigError(f"unknown ARHMM option(s): {', '.join(sorted(unknown))}")
        return cls(**values)
