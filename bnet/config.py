"""Project configs and search spaces.

One YAML file per study with sections ``data``, ``model``, ``training``, ``compute`` (the
four BehaveNet JSON configs, whose files are accepted unchanged) and ``tuning``. Every
value is a search dimension:

* a scalar is fixed;
* a list is categorical (BehaveNet's grid-search lists become Optuna choices);
* a mapping with ``low``/``high`` (optional ``log``, ``step``) is a range, integer when both
  bounds are integers.

Unknown keys are errors naming the key and the section. CLI options override the file.
"""

from __future__ import annotations

import math
import re
import types
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union, get_type_hints

import yaml

from bnet.errors import ConfigError

SECTIONS = ("data", "model", "training", "compute", "downstream")

# Keys each section accepts. BehaveNet put the split keys in its training JSON and bnet's
# design puts them under data: both are accepted.
SECTION_KEYS: dict[str, set[str]] = {
    "data": {
        "data", "data_dir", "save_dir", "lab", "expt", "animal", "session", "trial_splits",
        "rng_seed_data", "train_frac", "n_input_channels", "y_pixels", "x_pixels",
        "use_output_mask", "use_label_mask", "neural_bin_size", "neural_type",
        "approx_batch_size", "sessions_csv", "all_source",
        "subsample_method", "subsample_idxs_group_0", "subsample_idxs_group_1",
        "subsample_idxs_dataset",
    },
    "model": {
        "model_class", "model_type", "n_ae_latents", "l2_reg", "rng_seed_model",
        "fit_sess_io_layers", "ae_arch_json", "experiment_name",
        # the searchable AE architecture, and a BehaveNet key bnet ignores (each model class's
        # own keys come from its registered config: registered_model_keys)
        "ae_n_conv_layers", "ae_first_channels", "ae_kernel_size", "ps_vae.gamma",
        # segmentation (BehaveNet's arhmm_model.json)
        "n_arhmm_states", "n_arhmm_lags", "noise_type", "transitions", "kappa", "alpha",
        "arhmm_es_tol", "ae_experiment_name", "ae_version", "ae_model_type",
        # decoders (BehaveNet's decoding_*_model.json)
        "n_lags", "n_max_lags", "n_hid_layers", "n_hid_units", "activation", "noise_dist", "bidirectional",
        "standardize_inputs",
        "arhmm_experiment_name", "arhmm_version", "arhmm_model_type",
    },
    "training": {
        "learning_rate", "max_n_epochs", "min_n_epochs", "enable_early_stop",
        "early_stop_history", "early_stop_min_delta", "val_check_interval", "batch_size", "rng_seed_train",
        "export_latents", "export_train_plots", "export_latents_best", "as_numpy",
        "batch_load", "rng_seed_data", "train_frac", "trial_splits", "sessions_csv",
        "n_iters", "arhmm_es_tol", "export_states", "engine", "augment_shift", "augment_rotation",
    },
    # a pipeline study's fixed downstream stages (bnet.tuning.families.pipeline.DownstreamConfig)
    "downstream": {
        "stages", "n_arhmm_states", "n_arhmm_lags", "arhmm_n_iters", "decoder_n_lags", "decoder_n_hid_layers",
        "decoder_n_hid_units", "decoder_learning_rate", "decoder_l2_reg", "decoder_max_n_epochs",
    },
    "compute": {
        "device", "precision", "n_parallel_gpus", "gpus_viz", "tt_n_gpu_trials",
        "tt_n_cpu_trials", "tt_n_cpu_workers", "mem_limit_gb", "slurm", "slurm_log_path",
        "slurm_param_file",
    },
}

FILLED = types.MappingProxyType({"filled": True})
"""Metadata of a model config's field that is filled in from the data or the architecture
(frame shape, label count, conv layers): not a key a config file sets."""


def is_filled(config_field) -> bool:
    return bool(config_field.metadata.get("filled"))

# BehaveNet keys about its own machinery (test-tube workers, paths, loaders): accepted so
# its JSON files load unchanged; each changes nothing in bnet, and saying so is a warning.
IGNORED_KEYS = {
    "save_dir": "runs and artifacts live in the MLflow store (--store / --tracking-uri)",
    "ps_vae.gamma": "BehaveNet's subspace-overlap weight, unused there too (the subspaces are orthogonal by construction)",
    "export_latents_best": "bnet always exports the best-val weights' latents (export_latents)",
    "as_numpy": "bnet reads trials from HDF5 as tensors",
    "batch_load": "bnet reads trials from HDF5 on demand",
    "approx_batch_size": "bnet batches by batch_size (frames) or whole trials",
    "n_parallel_gpus": "run several workers on one study instead (same --storage)",
    "gpus_viz": "pick GPUs with CUDA_VISIBLE_DEVICES per worker",
    "tt_n_gpu_trials": "the trial count is tuning.n_trials / --n-trials",
    "tt_n_cpu_trials": "the trial count is tuning.n_trials / --n-trials",
    "tt_n_cpu_workers": "run several workers on one study instead (same --storage)",
    "slurm": "start workers with your scheduler, all pointed at one --storage",
    "slurm_log_path": "start workers with your scheduler, all pointed at one --storage",
    "slurm_param_file": "start workers with your scheduler, all pointed at one --storage",
    "neural_bin_size": "informational: bnet reads neural activity as binned in the file",
    "neural_type": "informational: spike counts are detected from the data (Poisson encoders)",
    "ae_model_type": "the AE is resolved by MLflow query (--ae best|RUN_ID|models:/NAME@ALIAS)",
    "arhmm_model_type": "the ARHMM is resolved by MLflow query (--arhmm best|RUN_ID|models:/NAME@ALIAS)",
}

# BehaveNet features bnet does not implement yet: their neutral value is accepted (so
# BehaveNet's default JSON files load), anything else is refused rather than dropped.
UNIMPLEMENTED_KEYS = {
    "subsample_idxs_group_1": (None, "bnet subsets neurons by regions/<subsample_idxs_group_0>/<name> only"),
}

# Where a session file lies (its digest, not its path, is what a fit depends on)
SESSION_KEYS = frozenset({"data", "data_dir", "lab", "expt", "animal", "session"})
# Which upstream runs a later stage reads (their run ids are what it depends on)
UPSTREAM_KEYS = frozenset({"ae_experiment_name", "ae_version", "arhmm_experiment_name", "arhmm_version"})
# Keys that name things rather than tune them: a list here is not a search dimension.
NOT_SEARCHABLE = SESSION_KEYS | UPSTREAM_KEYS | {"experiment_name", "sessions_csv", "all_source", "ae_arch_json",
                                                 "subsample_idxs_dataset"}


@dataclass(frozen=True)
class Categorical:
    choices: tuple


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    log: bool = False
    step: float | None = None

    @property
    def is_int(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)


Dimension = Union[Categorical, Range]


DEFAULT_N_TRIALS = 10
SCHEDULERS = ("optuna", "pbt")


@dataclass
class TuningConfig:
    """The search itself.

    Attributes:
        n_trials: finished (complete or pruned) trials the study should hold; re-running
            a command tops the study up to this number, so a killed study resumes. Default
            10, or no limit where ``budget_steps`` or ``timeout`` bounds the study.
        budget_steps: the compute the study may spend, in steps trained over all its trials
            (epochs; EM iterations for ARHMMs): trials start while fewer have been spent, so
            the last one may overshoot by at most its own steps. With pruning, more trials
            fit in the same budget. Shared by every worker; a larger budget resumes a study.
        timeout: seconds after which this command starts no further trial (the running one
            finishes), as Optuna's ``timeout``.
        sampler: one of :data:`bnet.tuning.samplers.SAMPLERS`: ``tpe`` (Bayesian, default;
            conditional and categorical spaces), ``gp`` (a Gaussian process; small budgets of mostly
            continuous dimensions), ``cmaes`` (CMA-ES; ranges only, categorical dimensions
            are sampled at random beside it), ``qmc`` (a scrambled Sobol sequence: even
            coverage without a model), ``random`` or ``grid``.
        pruner: ``auto`` (default: ``hyperband`` where ``budget_steps`` bounds the study,
            else ``median``), ``median``, ``hyperband`` or ``none``; prunes on the family's
            per-step objective (per-epoch val loss, per-epoch val R², per-iteration val ll).
        metric: the run metric that ranks trials; default (None) the family's objective
            (``best_val_loss``, ``val_ll_per_step``, ``val_r2`` or ``val_ll``). AE studies
            may name any final metric their trials log (``best_val_pixel_mse``,
            ``val_label_r2``, ``val_unsup_corr``...), or a list of them for a
            multi-objective study (its answer is the Pareto front).
        direction: ``minimize`` or ``maximize`` (a list, one per metric); default the
            metric's natural direction.
        seed: sampler seed.
        study: Optuna study name (default: the experiment name).
        warm_start: ``EXPERIMENT[:STUDY]``: begin a new study from the finished runs of
            earlier ones of the same model class (:mod:`bnet.tuning.warm_start`): their best
            configurations are fitted first, and where they were fitted to the same data the
            sampler learns from their results.
        warm_start_any_data: warm-start from runs fitted to any data (their configurations
            are queued; their results, which answer another question, are not used).
        system_metrics: log each trial's CPU, memory, disk, network and GPU use beside its
            metrics (MLflow's system metrics, ``system/...``, every 10 s or
            ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``), for the UI's System metrics tab.
        enqueue: points of the search space to fit first, in order (a list of mappings of
            searched hyperparameters, as Optuna's ``enqueue_trial``: a value a point leaves
            out is sampled): known good settings, or a comparison you want in the study.
            Queued when the study is created; a resumed study does not queue them again.
        scheduler: ``optuna`` (default: trials one after another, sampled and pruned by
            Optuna) or ``pbt``: population-based training (Ray Tune's
            ``PopulationBasedTraining``, ``pip install 'bnet[pbt]'``) for families trained by
            epochs (``ae``, ``decoder``): ``population`` members train at once, and every
            ``perturbation_interval`` epochs the worst quarter take the weights and
            hyperparameters of the best quarter and perturb the searched continuous ones
            (learning rate, regularisation) by x0.8 or x1.2, or draw them anew (p = 0.25).
        population: members of a ``pbt`` population.
        perturbation_interval: epochs between a ``pbt`` population's exploit-and-explore steps.
    """

    n_trials: int | None = None
    budget_steps: int | None = None
    timeout: float | None = None
    sampler: str = "tpe"
    pruner: str = "auto"
    metric: str | list | None = None
    direction: str | list | None = None
    seed: int | None = 0
    study: str | None = None
    enqueue: list | None = None
    warm_start: str | None = None
    warm_start_any_data: bool = False
    system_metrics: bool = False
    scheduler: str = "optuna"
    population: int = 4
    perturbation_interval: int = 4

    @property
    def pruner_name(self) -> str:
        """The pruner ``auto`` stands for: Hyperband where a step budget bounds the study (a
        cut trial then frees its steps for more trials; ``bench/search_efficiency.py`` found
        TPE + Hyperband nearest the grid's best soonest), the median pruner where a trial
        count does (a cut trial still takes one of the trials, so it cuts only clear losers)."""
        if self.pruner != "auto":
            return self.pruner
        return "hyperband" if self.budget_steps else "median"

    @property
    def trial_limit(self) -> int | float:
        """The finished trials the study should hold (infinite: a budget or timeout decides)."""
        if self.n_trials is not None:
            return self.n_trials
        return math.inf if self.budget_steps or self.timeout else DEFAULT_N_TRIALS

    def validate(self) -> None:
        for name in ("n_trials", "budget_steps", "population", "perturbation_interval"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"tuning.{name} must be at least 1, got {value}")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError(f"tuning.timeout must be a positive number of seconds, got {self.timeout}")
        if self.enqueue is not None and not all(isinstance(point, dict) and point for point in self.enqueue):
            raise ConfigError(f"tuning.enqueue must be a list of mappings of hyperparameters, got {self.enqueue!r}")
        from bnet.tuning.samplers import AUTO_PRUNER, PRUNERS, SAMPLERS

        choices = {"sampler": tuple(SAMPLERS), "pruner": (AUTO_PRUNER, *PRUNERS), "scheduler": SCHEDULERS}
        directions = self.direction if isinstance(self.direction, list) else [self.direction]
        for direction in directions:
            if direction not in ("minimize", "maximize", None):
                raise ConfigError(f"tuning.direction '{direction}' is not one of minimize, maximize")
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        if not all(m is None or isinstance(m, str) for m in metrics) or (isinstance(self.metric, list) and not metrics):
            raise ConfigError(f"tuning.metric must be a metric name or a list of them, got {self.metric!r}")
        if isinstance(self.direction, list) and len(directions) != len(metrics):
            raise ConfigError(f"tuning.direction lists {len(directions)} directions for {len(metrics)} metrics")
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"tuning.{name} '{getattr(self, name)}' is not one of {', '.join(filter(None, allowed))}"
                )


@dataclass
class ProjectConfig:
    """A parsed study config: fixed values and search dimensions by hyperparameter name."""

    experiment: str | None = None
    values: dict[str, Any] = field(default_factory=dict)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    sources: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def fixed(self) -> dict[str, Any]:
        return {k: v for k, v in self.values.items() if not isinstance(v, (Categorical, Range))}

    def dimensions(self) -> dict[str, Dimension]:
        return {k: v for k, v in self.values.items() if isinstance(v, (Categorical, Range))}

    def override(self, **values: Any) -> None:
        """Set fixed values from CLI options (None leaves the file's value)."""
        for key, value in values.items():
            if value is not None:
                self.values[key] = value


def parse_value(key: str, value: Any, where: str) -> Any:
    """Turn one config value into a fixed value or a search dimension."""
    if key in NOT_SEARCHABLE:
        return value
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{where}: '{key}' is an empty list (an empty search range)")
        return value[0] if len(value) == 1 else Categorical(tuple(value))
    if isinstance(value, dict):
        unknown = set(value) - {"low", "high", "log", "step"}
        if unknown or not {"low", "high"} <= set(value):
            raise ConfigError(
                f"{where}: '{key}' must be a scalar, a list, or a mapping with low/high "
                f"(and optional log, step); got keys {sorted(value)}"
            )
        low, high = value["low"], value["high"]
        if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in (low, high)):
            raise ConfigError(f"{where}: '{key}' range bounds must be numbers, got {low!r}, {high!r}")
        if low > high:
            raise ConfigError(f"{where}: '{key}' range is empty (low {low} > high {high})")
        log = bool(value.get("log", False))
        if log and low <= 0:
            raise ConfigError(f"{where}: '{key}' log range needs low > 0, got {low}")
        step = value.get("step")  # None (no step) is how plain_value writes it
        if log and step is not None:
            raise ConfigError(f"{where}: '{key}' cannot have both log and step")
        return Range(low, high, log, step)
    return value


def plain_value(value: Any) -> Any:
    """A value as the config file writes it: a list for a categorical dimension, a mapping
    for a range (the inverse of :func:`parse_value`)."""
    if isinstance(value, Categorical):
        return list(value.choices)
    if isinstance(value, Range):
        return {"low": value.low, "high": value.high, "log": value.log, "step": value.step}
    return value


def _merge_section(config: ProjectConfig, section: str, content: Any, source: str) -> None:
    if content is None:
        return
    if not isinstance(content, dict):
        raise ConfigError(f"{source}: section '{section}' must be a mapping")
    allowed = SECTION_KEYS[section]
    for key, value in content.items():
        if key not in allowed and not (section == "model" and key in registered_model_keys()):
            raise ConfigError(f"{source}: unknown key '{key}' in section '{section}'")
        if key in UNIMPLEMENTED_KEYS:
            neutral, why = UNIMPLEMENTED_KEYS[key]
            if value not in (neutral, None):
                raise ConfigError(f"{source} [{section}]: '{key}: {value}' is refused: {why}")
            continue
        if key in IGNORED_KEYS:
            config.notes.append(f"{source} [{section}]: '{key}' is accepted and ignored: {IGNORED_KEYS[key]}")
            continue
        config.values[key] = parse_value(key, value, f"{source} [{section}]")
    if section == "model" and "experiment_name" in content and config.experiment is None:
        config.experiment = str(content["experiment_name"])


# a string literal (kept whole, whatever it holds, a line continued by a backslash too) or a
# '#' that starts a comment
_STRING_OR_HASH = re.compile(r""""(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|#""", re.DOTALL)


def read_behavenet_json(path: str | Path) -> dict[str, Any]:
    """Read a BehaveNet JSON config: ``#`` comments (BehaveNet's), ``//`` comments and
    trailing commas allowed. JSON5 (a maintained parser, strict otherwise) reads it once each
    ``#`` outside a string is its ``//``."""
    import json5

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    try:
        content = json5.loads(_STRING_OR_HASH.sub(lambda m: "//" if m.group() == "#" else m.group(), text))
    except ValueError as err:
        where, _, what = str(err).removeprefix("<string>:").partition(" ")
        raise ConfigError(f"{path}: not valid JSON ({what} on line {where})") from None
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return content


def load_project_config(
    yaml_path: str | Path | None = None, behavenet_jsons: dict[str, str | Path] | None = None
) -> ProjectConfig:
    """Read a project YAML and/or BehaveNet's JSON configs (``{section: path}``).

    JSON files are applied after the YAML, so they win where both set a key.
    """
    config = ProjectConfig()
    if yaml_path is not None:
        path = Path(yaml_path)
        try:
            content = yaml.load(path.read_text(), Loader=_YAMLLoader) or {}
        except OSError as err:
            raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(content, dict):
            raise ConfigError(f"{path}: expected a mapping of sections")
        config.sources.append(str(path))
        for key, value in content.items():
            if key == "experiment":
                config.experiment = str(value)
            elif key == "tuning":
                config.tuning = _tuning(value, str(path))
            elif key in SECTIONS:
                _merge_section(config, key, value, str(path))
            else:
                raise ConfigError(
                    f"{path}: unknown section '{key}' (expected experiment, "
                    f"{', '.join(SECTIONS)}, tuning)"
                )
    for section, json_path in (behavenet_jsons or {}).items():
        if json_path is None:
            continue
        if section not in SECTIONS:
            raise ConfigError(f"unknown BehaveNet config section '{section}'")
        config.sources.append(str(json_path))
        _merge_section(config, section, read_behavenet_json(json_path), str(json_path))
    return config


def registered_model_keys() -> frozenset[str]:
    """The ``model`` keys the registered model classes declare in their configs (a new
    class's own hyperparameters, such as ``vae.beta``, are accepted once it is registered).
    Read only for a key outside :data:`SECTION_KEYS`: importing the models imports torch."""
    from bnet.models.registry import declared_keys

    elsewhere = set().union(*(SECTION_KEYS[s] for s in SECTIONS if s != "model"))
    return declared_keys() - elsewhere


class _YAMLLoader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where ``1e-4`` (no dot) is a string; YAML 1.2 and every
    user mean a float."""


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _tuning(content: Any, source: str) -> TuningConfig:
    if not isinstance(content, dict):
        raise ConfigError(f"{source}: section 'tuning' must be a mapping")
    names = {f.name for f in fields(TuningConfig)}
    for key in content:
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{key}' in section 'tuning'")
    tuning = dataclass_from_values(TuningConfig, content, where=f"{source} [tuning]")
    tuning.validate()
    return tuning


def dataclass_from_values(cls: type, values: dict[str, Any], where: str = ""):
    """Build a config dataclass from the flat hyperparameters it has fields for, each
    checked against the field's declared type (a wrong type names the key)."""
    hints = get_type_hints(cls)
    chosen = {}
    for f in fields(cls):
        key = f.metadata.get("key", f.name)  # BehaveNet's dotted names (vae.beta -> vae_beta)
        if key in values:
            chosen[f.name] = typed_value(key, values[key], hints[f.name], where)
    return cls(**chosen)


def named_values(config: Any) -> dict[str, Any]:
    """A config dataclass's values under their hyperparameter names (dotted where BehaveNet's are)."""
    return {f.metadata.get("key", f.name): getattr(config, f.name) for f in fields(config)}


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def typed_value(key: str, value: Any, hint: Any, where: str = "") -> Any:
    """``value`` as the type ``hint`` declares (int, float, bool, str, optionally None), or
    a :class:`ConfigError` naming ``key``. Whole floats pass as ints (ranges may yield them)."""
    options = hint.__args__ if isinstance(hint, types.UnionType) or getattr(hint, "__origin__", None) is Union else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
        if option not in _TYPE_WORDS and option is not type(None):
            return value  # a type this check does not cover (lists, nested configs)
    expected = " or ".join(_TYPE_WORDS[o] for o in options if o in _TYPE_WORDS)
    if type(None) in options:
        expected += " or null"
    prefix = f"{where}: " if where else ""
    raise ConfigError(f"{prefix}'{key}' must be {expected}, got {value!r}")
