"""README "Extending bnet": a model class is one module, a family is one module.

This module is such a module: it registers a model class and a family, and nothing else in
bnet names them; the CLI, the study engine, ``bnet best``, the registry and the notebook API
find them all the same. The README's lists of extension points match the registries.
"""

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from mlflow import MlflowClient

import bnet
from bnet.config import Categorical, Range, load_project_config
from bnet.data import open_session
from bnet.errors import ConfigError
from bnet.models import model_classes, register
from bnet.tracking.store import resolve_store
from bnet.tuning.family import (
    Family, FamilyOption, Objective, PreparedStudy, TrialResult, family_names, register_family,
)
from bnet.tuning.samplers import AUTO_PRUNER, PRUNERS, SAMPLERS
from conftest import invoke

README = Path(__file__).resolve().parents[1] / "README.md"


# ------------------------------------------------------------------- a model class

@dataclass
class LevelConfig:
    """A model of one number: each frame's mean brightness."""

    model_class: str = "frame-level"
    start: float = 0.0
    momentum: float = 0.0


@register("frame-level", "frame-level", LevelConfig)
class FrameLevel(torch.nn.Module):
    def __init__(self, config: LevelConfig):
        super().__init__()
        self.config = config
        self.level = torch.nn.Parameter(torch.tensor(float(config.start)))


# ------------------------------------------------------------------- a family

def mean_brightness(session, trials) -> torch.Tensor:
    return torch.tensor(np.concatenate([session.read("images", t).mean(axis=(1, 2, 3)) / 255 for t in trials]))


class LevelTrials:
    """Gradient descent on the squared error of one level, from the family's ``--start``."""

    def __init__(self, session, start: float):
        trials = list(session.trials)
        self.train, self.val = mean_brightness(session, trials[::2]), mean_brightness(session, trials[1::2])
        self.start = start

    def check(self, hparams):
        pass

    def resolve(self, hparams):
        return {**hparams, "start": self.start}, {"bnet.model_class": "frame-level"}

    def metric_names(self, hparams):
        return {"best_val_loss": "minimize"}

    def fit(self, context):
        model = FrameLevel(LevelConfig(start=self.start))
        optimiser = torch.optim.SGD(model.parameters(), lr=context.hparams["learning_rate"],
                                    momentum=float(context.hparams.get("momentum", 0.0)))
        epochs = int(context.hparams["max_n_epochs"])
        best = float("inf")
        for epoch in range(epochs):
            optimiser.zero_grad()
            ((self.train - model.level) ** 2).mean().backward()
            optimiser.step()
            with torch.no_grad():
                best = min(best, float(((self.val - model.level) ** 2).mean()))
            context.report(epoch, {"val_loss": best}, epochs)
        return TrialResult({"best_val_loss": best}, model)


def prepare(request, store):
    session = open_session(request.data)
    return [PreparedStudy(session, LevelTrials(session, float(request.options.get("start", 0.0))),
                          Objective("best_val_loss", "minimize", "val_loss"))]


register_family(Family(
    name="frame-level", default_space={"learning_rate": Range(0.05, 0.5, log=True)},
    default_budget={"max_n_epochs": 4}, conditions={}, step_name="epoch", budget_key="max_n_epochs",
    prepare=prepare, default_model_class=lambda request: "frame-level",
    summary="Fit each frame's mean brightness with one number.",
    options=(FamilyOption("start", "Where the level starts."),),
))


def tune_frame_level(data, experiment, **options):
    """The family's Python face, found as ``bnet.tune_frame_level``."""
    return bnet.tune("frame-level", data, experiment, **options)


# ------------------------------------------------------------------- the tests

def test_a_family_defined_in_one_module_is_tuned_ranked_and_loaded_like_the_built_in_ones(tmp_path, tiny_session):
    store = tmp_path / "store"
    assert "frame-level" in invoke("tune", "--help")
    assert "--start TEXT" in invoke("tune", "frame-level", "--help")
    output = invoke("tune", "frame-level", "--data", tiny_session, "--experiment", "levels", "--start", "0.2",
                    "--n-trials", 3, "--seed", 0, "--store", store)
    assert "3 complete, 0 pruned, 0 failed" in output, output
    ranked = invoke("best", "frame-level", "--experiment", "levels", "--top", 3, "--store", store)
    assert ranked.count("run ") == 3
    best = bnet.best_runs("levels", family="frame-level", store=resolve_store(store))[0]
    assert best.params["start"] == "0.2"
    # what made the run: this bnet, and the commit of the repository the command ran in
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    tags = MlflowClient(resolve_store(store).tracking_uri).get_run(best.run_id).data.tags
    assert tags["bnet.version"] == bnet.__version__ and tags["mlflow.source.git.commit"] == head
    study = optuna.load_study(study_name="levels", storage=resolve_store(store).optuna_storage)
    assert study.metric_names == ["best_val_loss"]  # what optuna-dashboard and Optuna's plots call it
    model = bnet.load_model(best.run_id, store=resolve_store(store))
    level = float(model.level.detach())
    brightness = float(mean_brightness(open_session(tiny_session), list(open_session(tiny_session).trials)).mean())
    # it learned: from 0.2 towards the frames' mean brightness
    assert abs(level - brightness) < abs(0.2 - brightness)
    more = bnet.tune_frame_level(tiny_session, "levels", n_trials=4, store=resolve_store(store), echo=lambda _: None)
    assert more[0].n_complete == 4


def test_a_model_class_brings_its_own_config_keys(tmp_path):
    """The class's config declares ``momentum``: a config file may set or search it, and
    nothing else in bnet had to learn the name; a key no class declares is still an error."""
    config = tmp_path / "m.yaml"
    config.write_text("model: {model_class: frame-level, momentum: [0.0, 0.9]}\n")
    assert load_project_config(config).values["momentum"] == Categorical((0.0, 0.9))
    config.write_text("model: {model_class: frame-level, momentm: 0.9}\n")
    with pytest.raises(ConfigError, match="unknown key 'momentm' in section 'model'"):
        load_project_config(config)


def test_a_family_refuses_an_option_it_does_not_take(tiny_session, tmp_path):
    with pytest.raises(ConfigError, match=r"frame-level studies take no option target \(they take start\)"):
        bnet.tune("frame-level", tiny_session, "levels", target="ae", store=resolve_store(tmp_path / "store"))


def listed(name: str) -> set[str]:
    """The backticked names README's "Extending bnet" lists after ``- **name**``."""
    section = README.read_text().split("## Extending bnet", 1)[1].split("\n## ", 1)[0]
    line = re.search(rf"^- \*\*{name}\*\*.*?:(.*?)(?:\n\S|\n\n)", section, re.M | re.S)
    assert line, f"README's Extending bnet lists no {name}"
    return set(re.findall(r"`([^`]+)`", line.group(1)))


def test_the_readme_lists_what_the_registries_hold():
    built_in_families = {name for name in family_names() if name != "frame-level"}
    assert listed("Families") == built_in_families
    assert listed("Model classes") == {name for name in model_classes() if name != "frame-level"}
    assert listed("Samplers") == set(SAMPLERS)
    assert listed("Pruners") == {AUTO_PRUNER, *PRUNERS}
