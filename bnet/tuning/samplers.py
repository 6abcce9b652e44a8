"""The samplers and pruners a study can use: one table each, read by the config's validation,
the study engine and the CLI's ``--sampler``/``--pruner`` (adding one is one entry here).

Optuna is imported by the factories only, so the config and ``--help`` stay light.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from bnet.errors import ConfigError

if TYPE_CHECKING:
    from bnet.config import TuningConfig
    from bnet.tuning.space import SearchSpace


@dataclass(frozen=True)
class SamplerRequest:
    """What a sampler is made for: the study's settings, its space, the worker's seed and
    how many objectives it optimises."""

    tuning: "TuningConfig"
    space: "SearchSpace"
    seed: int | None
    n_objectives: int = 1

    @property
    def startup(self) -> int:
        """Random trials before a model-based sampler's model has data to learn from: a third
        of a small study, ten at most."""
        limit = self.tuning.trial_limit
        return min(10, max(2, limit // 3)) if math.isfinite(limit) else 10


@dataclass(frozen=True)
class Choice:
    """One sampler or pruner: its ``--help`` words and how to make it."""

    help: str
    make: Callable[..., Any]


def _tpe(request: SamplerRequest):
    import optuna

    return optuna.samplers.TPESampler(seed=request.seed, multivariate=True, group=True,
                                      n_startup_trials=request.startup)


def _gp(request: SamplerRequest):
    import optuna

    return optuna.samplers.GPSampler(seed=request.seed, n_startup_trials=request.startup)


def _cmaes(request: SamplerRequest):
    import optuna

    from bnet.config import Range

    if request.n_objectives > 1:
        raise ConfigError("--sampler cmaes optimises one objective; a multi-objective study needs tpe, gp, "
                          "qmc, random or grid")
    dimensions = request.space.dimensions
    if not any(isinstance(dim, Range) for dim in dimensions.values()):
        raise ConfigError("--sampler cmaes searches ranges, and this study searches only lists "
                          f"({', '.join(dimensions) or 'nothing'}); use tpe, gp or grid")
    # a pruned trial's last value still tells CMA-ES where not to go
    return optuna.samplers.CmaEsSampler(
        seed=request.seed, n_startup_trials=request.startup, warn_independent_sampling=False,
        independent_sampler=optuna.samplers.RandomSampler(seed=request.seed),
        consider_pruned_trials=request.tuning.pruner_name != "none")


def _qmc(request: SamplerRequest):
    import optuna

    return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=request.seed)


def _random(request: SamplerRequest):
    import optuna

    return optuna.samplers.RandomSampler(seed=request.seed)


def _grid(request: SamplerRequest):
    import optuna

    class Grid(optuna.samplers.GridSampler):
        """Optuna's grid sampler, for ask and tell: its after-trial hook only stops
        ``Study.optimize`` once every point is taken (and raises outside it); the study loop
        stops at the grid's size itself."""

        def after_trial(self, study, trial, state, values) -> None:
            pass

    return Grid(request.space.grid(), seed=request.seed)


SAMPLERS: dict[str, Choice] = {
    "tpe": Choice("Bayesian (the default; conditional and categorical spaces)", _tpe),
    "gp": Choice("a Gaussian process (small budgets of continuous ranges)", _gp),
    "cmaes": Choice("CMA-ES (ranges; lists sampled at random beside it)", _cmaes),
    "qmc": Choice("a scrambled Sobol sequence (even coverage, no model)", _qmc),
    "random": Choice("independent random points", _random),
    "grid": Choice("every point of the lists (ranges need a step)", _grid),
}


def _median(budget: int | None):
    """The median pruner waits a fifth of the budget (at least five steps): a lower learning
    rate starts slower without ending worse. With a 5-step wait on a 30-epoch budget it cut 8
    of 10 trials of the open-field AE study at epoch 5, learning rates 1e-4 to 1e-3 among
    them, on the two finished trials' epoch-5 losses."""
    import optuna

    warmup = max(5, budget // 5) if budget else 5
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=warmup)


def _hyperband(budget: int | None):
    import optuna

    return optuna.pruners.HyperbandPruner(max_resource=budget or "auto")


def _no_pruner(budget: int | None):
    import optuna

    return optuna.pruners.NopPruner()


PRUNERS: dict[str, Choice] = {
    "median": Choice("cut a trial worse than the median of finished ones at the same step", _median),
    "hyperband": Choice("successive halving over brackets (budgets of steps)", _hyperband),
    "none": Choice("every trial runs to its end", _no_pruner),
}

# ``auto`` is no pruner of its own: TuningConfig.pruner_name says which it stands for
AUTO_PRUNER = "auto"


def make_sampler(tuning: "TuningConfig", space: "SearchSpace", seed: int | None, n_objectives: int = 1):
    """The study's sampler, from :data:`SAMPLERS`."""
    return SAMPLERS[tuning.sampler].make(SamplerRequest(tuning, space, seed, n_objectives))


def make_pruner(tuning: "TuningConfig", budget: int | None = None):
    """The study's pruner (``auto`` resolved by ``tuning.pruner_name``), from :data:`PRUNERS`;
    ``budget`` is a trial's steps at most (epochs, EM iterations), where fixed."""
    return PRUNERS[tuning.pruner_name].make(budget)


def described(table: dict[str, Choice]) -> str:
    """The table in words, for ``--help``."""
    return "; ".join(f"{name}: {choice.help}" for name, choice in table.items())
