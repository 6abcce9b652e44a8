"""bnet: BehaveNet's pipeline as an experiment platform (Optuna studies, MLflow runs).

The notebook API mirrors the CLI::

    import bnet
    bnet.synthesize("demo.hdf5")
    outcome = bnet.tune_ae("demo.hdf5", experiment="ae-demo", n_trials=4, max_epochs=5)
    # the same for every family: bnet.tune("decoder", "demo.hdf5", target="ae", ae="best", ...)
    best = bnet.best_runs("ae-demo", family="ae")[0]
    model = bnet.load_model(best.run_id)            # or "models:/ae-demo@champion"

Names are imported on first use so ``import bnet`` stays light. ``tune_<family>`` is the
Python face a family's module defines beside its declaration (``tune_ae``, ``tune_arhmm``,
``tune_decoder``), found through the family registry.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bnet")  # one place: pyproject.toml
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

_API = {
    "best_runs": "bnet.tracking.query",
    "get_run": "bnet.tracking.query",
    "load_model": "bnet.tracking.registry",
    "register_run": "bnet.tracking.registry",
    "resolve_store": "bnet.tracking.store",
    "tune": "bnet.tuning.tune",
    "build_ensemble": "bnet.ensemble.build",
    "load_project_config": "bnet.config",
    "open_session": "bnet.data.session",
    "split_trials": "bnet.data.splits",
    "synthesize": "bnet.data.synth",
    "SynthConfig": "bnet.data.synth",
    "build_model": "bnet.models.registry",
    "load_checkpoint": "bnet.models.checkpoint",
}

__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    if name.startswith("tune_"):
        from bnet.tuning.family import family_names, get_family

        family = name.removeprefix("tune_").replace("_", "-")
        if family in family_names():
            function = getattr(import_module(get_family(family).prepare.__module__), name, None)
            if function is not None:
                return function
    raise AttributeError(f"module 'bnet' has no attribute '{name}'")
