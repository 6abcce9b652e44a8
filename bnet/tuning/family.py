"""How a model family is declared to the study engine.

A family says once what its studies optimise (:class:`Objective`), what they search when
the user's config searches nothing (``default_space``, BehaveNet's recommended ranges),
what they fix when the user does not (``default_budget``), which dimensions are
conditional, and how to turn a session and its upstream runs into trials to fit
(``prepare``). ``bnet tune``, ``bnet best``/``register``, ensembles, upstream resolution
and the summaries all read these declarations; adding a family is one module that calls
:func:`register_family`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from bnet.config import SESSION_KEYS, Dimension, ProjectConfig
from bnet.errors import ConfigError
from bnet.extensions import load_entry_point, package_modules

if TYPE_CHECKING:
    from bnet.data.session import Session
    from bnet.tracking.store import Store
    from bnet.tuning.space import Condition
    from bnet.tuning.study import TrialContext
    from bnet.tuning.trivial import TrivialComparison

DIRECTIONS = ("minimize", "maximize")


@dataclass(frozen=True)
class Objective:
    """What a study optimises.

    Attributes:
        metric: the final run metric that ranks trials (what ``bnet best`` orders by).
        direction: ``minimize`` or ``maximize``, for ``metric`` and ``step_metric`` alike.
        step_metric: the per-step series (per epoch, per EM iteration) the pruner sees:
            the same quantity as ``metric`` on the same scale and direction, under its own
            name (MLflow's latest value of a metric is the one with the highest step); ""
            when the metric has no per-step series (nothing to prune on).
        others: further ``(metric, direction)`` objectives of a multi-objective study, whose
            answer is the Pareto front (not pruned: Optuna prunes single objectives only).
    """

    metric: str
    direction: str
    step_metric: str
    others: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        for direction in (self.direction, *(d for _, d in self.others)):
            if direction not in DIRECTIONS:
                raise ValueError(f"direction must be minimize or maximize, got {direction!r}")

    @property
    def metrics(self) -> tuple[str, ...]:
        return (self.metric, *(m for m, _ in self.others))

    @property
    def directions(self) -> tuple[str, ...]:
        return (self.direction, *(d for _, d in self.others))

    @property
    def is_multi(self) -> bool:
        return bool(self.others)

    def describe(self) -> str:
        return ", ".join(f"{d} {m}" for m, d in zip(self.metrics, self.directions))


@dataclass(frozen=True)
class TrialResult:
    """What fitting one trial produced.

    Attributes:
        metrics: final metrics, the objective's ``metric`` among them.
        model: the fitted model (a registry model with ``config`` and ``state_dict``),
            saved as the run's checkpoint; None where the trial's stage runs hold its models
            (a pipeline's).
        checkpoint_metadata: extra fields the checkpoint records.
    """

    metrics: dict[str, float]
    model: Any
    checkpoint_metadata: dict[str, Any] = field(default_factory=dict)


class TrialFitter(Protocol):
    """Fits one model per trial for one prepared study."""

    def check(self, hparams: dict[str, Any]) -> None:
        """Raise a BnetError if this point of the space cannot be fitted."""

    def resolve(self, hparams: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """Every hyperparameter the fit uses (defaults included) and the run's model tags."""

    def metric_names(self, hparams: dict[str, Any]) -> dict[str, str]:
        """The final metrics a trial at this point logs that a study may optimise
        (``tuning.metric``), each with the direction that is better."""

    def fit(self, context: "TrialContext") -> TrialResult:
        """Fit, reporting each step through ``context.report``; log exports and figures."""


@dataclass
class PreparedStudy:
    """One study a family prepared from a request: its data, trials and answer.

    Attributes:
        session: the session file the trials fit.
        fitter: fits a trial.
        objective: what the study optimises.
        run_tags: tags of every run beyond the session's (upstream run ids, target).
        study_suffix: appended to the study name (one decoder study per neuron subset).
    """

    session: "Session"
    fitter: TrialFitter
    objective: Objective
    run_tags: dict[str, str] = field(default_factory=dict)
    study_suffix: str = ""


@dataclass(frozen=True)
class FamilyOption:
    """An option a family's studies take beyond every family's (``bnet tune NAME --NAME``,
    ``tune(NAME, ..., NAME=value)``), e.g. a decoder's behaviour target.

    Attributes:
        name: the keyword (``target``); the flag is ``--target`` (underscores as dashes).
        help: one sentence for ``--help``.
        choices: the values allowed, where there are few.
        flag: a switch (True when given).
        required: the command refuses to run without it.
        config_key: the value overrides the config's value of the same name (e.g. the ARHMM
            ``engine``) rather than reaching ``prepare`` through :attr:`StudyRequest.options`.
    """

    name: str
    help: str
    choices: tuple[str, ...] | None = None
    flag: bool = False
    required: bool = False
    config_key: bool = False


@dataclass
class StudyRequest:
    """What the user asked for, with the config's fixed values and space already merged
    with the family's defaults.

    Attributes:
        data: the session file (``--data``; else the config's ``data`` or BehaveNet's
            ``data_dir/lab/expt/animal/session``).
        values: fixed hyperparameters and search dimensions by name.
        upstream: ``{family: (reference, experiment)}`` for ``--ae``/``--arhmm``.
        options: the family's own options (:attr:`Family.options`) the user gave.
    """

    data: str | Path | None
    values: dict[str, Any]
    upstream: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    """A model family as the study engine knows it.

    Attributes:
        name: ``ae``, ``arhmm``, ``decoder``; tagged on every run as ``bnet.family``.
        default_space: searched when the user's config searches nothing; or a function of
            the config's fixed values that returns it (the space can depend on, e.g., the
            model type).
        default_budget: fixed values (epochs, patience, EM iterations) used where the
            user sets none, sized so a zero-config study runs in minutes.
        conditions: conditional dimensions, by name.
        step_name: what one reported step is, in progress lines (``epoch``).
        budget_key: the hyperparameter that bounds a trial's steps (``max_n_epochs``).
        prepare: the studies a request asks for (``(request, store) -> [PreparedStudy]``).
        default_model_class: the ``model_class`` when the config names none.
        machinery: keys that say where things are or how to show them, not what is fitted
            (they may differ between the workers and resumptions of one study, and are no
            part of a fit's identity).
        expand_fixed: the fixed values as they determine the fit (e.g. an architecture file
            read into the architecture it names), for the study's fingerprint.
        trivial: how a run's final metrics compare with the family's trivial answer (the
            mean frame, one state, a constant: :mod:`bnet.tuning.trivial`); None for runs
            without the metrics it needs.
        summary: what the family tunes, in one sentence (``bnet tune NAME --help``).
        upstream: the upstream runs a study reads, each by a family's name or a role
            (``state_decoder``: ``--state-decoder REF``, ``--state-decoder-experiment``).
        options: the family's own options (:class:`FamilyOption`).
        behavenet_configs: the BehaveNet JSON sections it reads (``--model-config`` ...).
        budget_flag: a trial's steps on the command line (``--max-epochs``, ``--budget-epochs``).
        default_device: where trials fit when the user names no device, in ``--help``.
        shown_params: the hyperparameters ``bnet best`` shows beside each run.
        population_based: its fits train by epochs and go on from a checkpoint
            (``TrialContext.resume``), so a study may train them as a population
            (``--scheduler pbt``).
    """

    name: str
    default_space: dict[str, Dimension] | Callable[[dict[str, Any]], dict[str, Dimension]]
    default_budget: dict[str, Any]
    conditions: dict[str, "Condition"]
    step_name: str
    budget_key: str
    prepare: Callable[[StudyRequest, "Store"], list[PreparedStudy]]
    default_model_class: Callable[[StudyRequest], str]
    machinery: frozenset[str] = frozenset()
    expand_fixed: Callable[[dict[str, Any]], dict[str, Any]] = dict
    trivial: Callable[[Mapping[str, float]], "TrivialComparison | None"] = lambda metrics: None
    summary: str = ""
    upstream: tuple[str, ...] = ()
    options: tuple[FamilyOption, ...] = ()
    behavenet_configs: tuple[str, ...] = ("model", "training")
    budget_flag: str = "epochs"
    default_device: str = "auto"
    shown_params: tuple[str, ...] = ()
    population_based: bool = False

    def request_options(self, given: dict[str, Any]) -> tuple[dict[str, tuple[Any, Any]], dict[str, Any]]:
        """Split keyword arguments of :func:`bnet.tuning.tune.tune` into upstream references
        (``{family: (reference, experiment)}`` from ``ae=``, ``ae_experiment=``) and the
        family's own options; an argument the family does not take is an error naming it."""
        upstream = {name: (given.pop(name, None), given.pop(f"{name}_experiment", None)) for name in self.upstream}
        known = {option.name for option in self.options}
        unknown = sorted(set(given) - known)
        if unknown:
            takes = [*(f"{n}, {n}_experiment" for n in self.upstream), *sorted(known)]
            raise ConfigError(f"{self.name} studies take no option {', '.join(unknown)} "
                              f"(they take {', '.join(takes) or 'only the options every family takes'})")
        for option in self.options:
            if option.required and given.get(option.name) is None:
                raise ConfigError(f"{self.name} studies need {option.name} (--{option.name.replace('_', '-')})")
            if option.choices and given.get(option.name) is not None and given[option.name] not in option.choices:
                raise ConfigError(f"--{option.name.replace('_', '-')} must be one of {', '.join(option.choices)}, "
                                  f"got '{given[option.name]}'")
        return upstream, {k: v for k, v in given.items() if v is not None}


# Where the session file lies and which device fits it: the same fit wherever (the data's
# digest, not its path, is part of a fit's identity). Every family's machinery holds these.
LOCATION_KEYS = SESSION_KEYS | {"device"}

BUILTIN_PACKAGE = "bnet.tuning.families"
ENTRY_POINT_GROUP = "bnet.families"
_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    if family.name in _FAMILIES:
        raise RuntimeError(f"family '{family.name}' registered twice")
    _FAMILIES[family.name] = family
    return family


def family_names() -> list[str]:
    """Every family's name, without importing any (the CLI lists them as commands): the
    modules of :data:`BUILTIN_PACKAGE` (``bayesian_decoder.py`` is ``bayesian-decoder``),
    installed ``bnet.families`` entry points and families registered by a notebook or test."""
    builtin = [name.rsplit(".", 1)[1].replace("_", "-") for name in package_modules(BUILTIN_PACKAGE)]
    return sorted({*builtin, *(point.name for point in entry_points(group=ENTRY_POINT_GROUP)), *_FAMILIES})


def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        module = f"{BUILTIN_PACKAGE}.{name.replace('-', '_')}"
        if module in package_modules(BUILTIN_PACKAGE):
            import_module(module)
        for point in entry_points(group=ENTRY_POINT_GROUP, name=name):
            load_entry_point(point)
    if name not in _FAMILIES:
        raise ConfigError(f"unknown model family '{name}' (known: {', '.join(family_names())})")
    return _FAMILIES[name]


def merged_values(family: Family, config: ProjectConfig) -> tuple[dict[str, Any], bool]:
    """The config's values over the family's budget, and its default space where the
    config searches nothing (minus what the user fixed). Returns (values, defaulted)."""
    values = {**family.default_budget, **config.values}
    if config.dimensions():
        return values, False
    space = family.default_space(config.values) if callable(family.default_space) else family.default_space
    for name, dim in space.items():
        if name not in config.values:
            values[name] = dim
    return values, True
