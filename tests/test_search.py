"""Search that spends compute well (issue: search that beats BehaveNet's grid): the samplers
beside TPE, studies bounded by the steps they train or by time, warm starts.

Real SQLite MLflow stores and Optuna storages; engine-level tests drive `run_study` with a
fitter whose answer is a known function of its hyperparameters.
"""

import math
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient

import bnet
from bnet.config import Categorical, Range, TuningConfig
from bnet.data import open_session
from bnet.errors import ConfigError
from bnet.models.decoders import DecoderConfig
from bnet.tracking import resolve_store
from bnet.tuning.family import Objective, PreparedStudy, TrialResult
from bnet.tuning.space import SearchSpace
from bnet.tuning.study import STEPS_ATTR, StudySpec, run_study
from conftest import invoke
from test_study_engine import STUB, storage_of, write


class BowlFitter:
    """A trial's loss is (x - 0.3)² + (log10 lr + 3)², reported over ``steps`` steps that
    each cost ``seconds``: the samplers have a known optimum to move towards."""

    def __init__(self, steps=3, seconds=0.0):
        self.steps, self.seconds = steps, seconds

    def check(self, hparams):
        pass

    def resolve(self, hparams):
        return dict(hparams), {"bnet.model_class": "stub"}

    def fit(self, context):
        hp = context.hparams
        loss = (hp["x"] - 0.3) ** 2 + (math.log10(hp["lr"]) + 3) ** 2 + hp.get("c", 0)
        for step in range(self.steps):
            time.sleep(self.seconds)
            context.report(step, {"val_loss": loss * (1 + 1 / (step + 1))}, self.steps)
        return TrialResult({"best_val_loss": loss},
                           bnet.build_model(DecoderConfig(model_class="neural-labels")))


SPACE = {"x": Range(0.0, 1.0), "lr": Range(1e-5, 1e-1, log=True)}


def bowl_spec(store, session, study, objective=None, dims=None, **tuning):
    fitter = BowlFitter(tuning.pop("steps", 3), tuning.pop("seconds", 0.0))
    return StudySpec("bowl", STUB, PreparedStudy(session, fitter,
                                                 objective or Objective("best_val_loss", "minimize", "val_loss")),
                     TuningConfig(study=study, pruner=tuning.pop("pruner", "none"), **tuning),
                     SearchSpace(dims or SPACE), {"rng_seed_model": 0}, resolve_store(store))


@pytest.mark.parametrize("sampler", ["gp", "cmaes", "qmc"])
def test_each_sampler_runs_a_study_and_learns(tmp_path, tiny_session, sampler):
    """GP, CMA-ES and Sobol points stay in the space and the model-based samplers end nearer
    the optimum than their own random start."""
    session = open_session(tiny_session)
    outcome = run_study(bowl_spec(tmp_path / "store", session, sampler, sampler=sampler, n_trials=14, seed=1),
                        echo=lambda line: None)
    assert outcome.n_complete == 14
    study = optuna.load_study(study_name=sampler, storage=storage_of(tmp_path / "store"))
    for trial in study.trials:
        assert 0 <= trial.params["x"] <= 1 and 1e-5 <= trial.params["lr"] <= 1e-1
    if sampler == "qmc":
        # a Sobol sequence covers the space evenly: every quarter of x holds some of its points
        assert {int(t.params["x"] * 4) for t in study.trials} == {0, 1, 2, 3}
    else:
        values = [t.value for t in study.trials]
        assert min(values[-4:]) < min(values[:4]), values


def test_cmaes_refuses_a_space_it_cannot_search(tmp_path, tiny_session):
    session = open_session(tiny_session)
    with pytest.raises(ConfigError, match="cmaes searches ranges"):
        run_study(bowl_spec(tmp_path / "store", session, "lists", sampler="cmaes", n_trials=2,
                            dims={"c": Categorical((0, 1))}), echo=lambda line: None)
    both = Objective("best_val_loss", "minimize", "", (("n_epochs", "minimize"),))
    with pytest.raises(ConfigError, match="cmaes optimises one objective"):
        run_study(bowl_spec(tmp_path / "store", session, "multi", objective=both, sampler="cmaes", n_trials=2),
                  echo=lambda line: None)


def test_a_step_budget_is_spent_and_never_overrun_by_more_than_one_trial(tmp_path, tiny_session):
    """A budget of 10 steps with 3-step trials: trials start while fewer than 10 are spent,
    so four run (12 steps), and a resumed study with a larger budget tops it up."""
    session = open_session(tiny_session)
    lines = []
    outcome = run_study(bowl_spec(tmp_path / "store", session, "budget", budget_steps=10), echo=lines.append)
    assert outcome.n_complete == 4 and outcome.steps_spent == 12
    assert "until 10 steps are spent (0 so far)" in lines[0]
    assert any("budget of 10 steps is spent (12 trained)" in line for line in lines)
    assert outcome.spent() == "12 steps trained of a budget of 10"
    study = optuna.load_study(study_name="budget", storage=storage_of(tmp_path / "store"))
    assert [t.user_attrs[STEPS_ATTR] for t in study.trials] == [3, 3, 3, 3]
    more = run_study(bowl_spec(tmp_path / "store", session, "budget", budget_steps=16), echo=lines.append)
    assert more.n_complete == 6 and more.steps_spent == 18
    # n_trials bounds a budgeted study too, whichever comes first (another seed: the same points
    # would be answered by the runs already fitted, at no cost)
    capped = run_study(bowl_spec(tmp_path / "store", session, "capped", budget_steps=100, n_trials=2, seed=7),
                       echo=lambda line: None)
    assert capped.n_complete == 2 and capped.steps_spent == 6


def test_pruned_trials_spend_only_the_steps_they_trained(tmp_path, tiny_session):
    """With pruning, a cut trial costs the epochs before its cut: more trials fit a budget."""
    session = open_session(tiny_session)
    spec = bowl_spec(tmp_path / "store", session, "pruned", budget_steps=60, steps=10, pruner="median")
    outcome = run_study(spec, echo=lambda line: None)
    study = optuna.load_study(study_name="pruned", storage=storage_of(tmp_path / "store"))
    steps = [t.user_attrs[STEPS_ATTR] for t in study.trials]
    assert outcome.n_pruned > 0 and outcome.n_complete + outcome.n_pruned > 6
    assert [len(t.intermediate_values) for t in study.trials] == steps
    assert 60 <= sum(steps) < 70 and outcome.steps_spent == sum(steps)


def test_a_timeout_stops_starting_trials(tmp_path, tiny_session):
    session = open_session(tiny_session)
    lines = []
    outcome = run_study(bowl_spec(tmp_path / "store", session, "timed", timeout=0.5, seconds=0.25),
                        echo=lines.append)
    assert outcome.n_complete == 1  # started at once, it outlasts the timeout and ends the study
    assert any("timeout of 0.5 s has passed" in line for line in lines)


def test_tuning_rejects_a_budget_below_one():
    with pytest.raises(ConfigError, match="tuning.budget_steps must be at least 1"):
        TuningConfig(budget_steps=0).validate()
    with pytest.raises(ConfigError, match="tuning.timeout must be a positive"):
        TuningConfig(timeout=-1).validate()


DECODER = """
experiment: dec-budget
model: {model_class: neural-labels, n_lags: 0, n_hid_layers: 0}
training:
  learning_rate: {low: 1.0e-3, high: 3.0e-2, log: true}
  max_n_epochs: 3
  min_n_epochs: 3
tuning: {pruner: none, seed: 0}
"""


def test_budget_epochs_from_the_cli(tmp_path, tiny_session):
    """`--budget-epochs 7` over 3-epoch trials: three trials, 9 epochs, said in the summary
    and on the parent run."""
    store = tmp_path / "store"
    config = write(tmp_path / "d.yaml", DECODER)
    output = invoke("tune", "decoder", "--data", tiny_session, "--target", "labels", "--config", config,
                    "--budget-epochs", 7, "--sampler", "gp", "--store", store)
    assert "3 complete, 0 pruned, 0 failed" in output
    assert "spent:  9 epochs trained of a budget of 7" in output
    client = MlflowClient(resolve_store(store).tracking_uri)
    experiment = client.get_experiment_by_name("dec-budget").experiment_id
    study_run = client.search_runs([experiment], "tags.`bnet.role` = 'study'")[0]
    assert study_run.data.metrics["steps_spent"] == 9 and study_run.data.params["tuning.budget_steps"] == "7"
    assert study_run.data.params["tuning.sampler"] == "gp"
    invoke("tune", "decoder", "--data", tiny_session, "--target", "labels", "--config", config,
           "--budget-epochs", 0, "--store", store, code=2)
    # a new experiment's study begins from this one's best configurations, refitted there
    warm = invoke("tune", "decoder", "--data", tiny_session, "--target", "labels", "--config", config,
                  "--experiment", "dec-warm", "--n-trials", 2, "--warm-start", "dec-budget", "--store", store)
    assert "warm start from dec-budget: 2 of its best configurations queued first, 3 of its trials on this " \
           "data given to the sampler" in warm
    best_earlier = sorted(optuna.load_study(study_name="dec-budget", storage=storage_of(store)).trials,
                          key=lambda t: -t.value)[0]
    first_own = [t for t in optuna.load_study(study_name="dec-warm", storage=storage_of(store)).trials
                 if "bnet_prior_run" not in t.user_attrs][0]
    assert first_own.params == best_earlier.params and first_own.value == pytest.approx(best_earlier.value)


def test_a_warm_start_fits_the_earlier_best_first_and_learns_from_the_same_data(tmp_path, tiny_session):
    session = open_session(tiny_session)
    store = tmp_path / "store"
    first = run_study(bowl_spec(store, session, "first", n_trials=8, seed=3), echo=lambda line: None)
    earlier = optuna.load_study(study_name="first", storage=storage_of(store))
    ranked = sorted(earlier.trials, key=lambda t: t.value)
    lines = []
    second = run_study(bowl_spec(store, session, "second", n_trials=3, seed=4, warm_start="bowl:first"),
                       echo=lines.append)
    assert "warm start from bowl:first: 3 of its best configurations queued first, 8 of its trials on this " \
           "data given to the sampler" in "\n".join(lines)
    study = optuna.load_study(study_name="second", storage=storage_of(store))
    priors = [t for t in study.trials if "bnet_prior_run" in t.user_attrs]
    own = [t for t in study.trials if "bnet_prior_run" not in t.user_attrs]
    assert len(priors) == 8 and sorted(t.value for t in priors) == [t.value for t in ranked]
    # its first trials are the earlier best configurations, best first (answered by their runs)
    assert [t.params for t in own] == [t.params for t in ranked[:3]]
    assert second.n_complete == 3 and second.best_value == first.best_value
    assert second.best_run_id in {t.user_attrs["mlflow_run_id"] for t in own}


def test_a_warm_start_from_other_data_queues_configurations_only(tmp_path, tiny_session):
    from bnet.data import SynthConfig, synthesize
    from conftest import TINY

    store = tmp_path / "store"
    run_study(bowl_spec(store, open_session(tiny_session), "first", n_trials=6, seed=3), echo=lambda line: None)
    other = open_session(synthesize(tmp_path / "other.hdf5", SynthConfig(**{**TINY.__dict__, "seed": 9})))
    lines = []
    run_study(bowl_spec(store, other, "cold", n_trials=2, warm_start="bowl:first"), echo=lines.append)
    assert "warm start from bowl:first: no finished runs in scope; the study starts cold" in lines
    run_study(bowl_spec(store, other, "any", n_trials=5, warm_start="bowl:first", warm_start_any_data=True),
              echo=lines.append)
    assert "warm start from bowl:first: 5 of its best configurations queued first" in lines
    study = optuna.load_study(study_name="any", storage=storage_of(store))
    assert not [t for t in study.trials if "bnet_prior_run" in t.user_attrs]
    with pytest.raises(ConfigError, match="--warm-start nowhere: no MLflow experiment named 'nowhere'"):
        run_study(bowl_spec(store, other, "bad", n_trials=1, warm_start="nowhere"), echo=lambda line: None)


def test_a_run_is_placed_in_the_new_space_only_where_it_fits():
    from bnet.tuning.space import Condition
    from bnet.tuning.warm_start import point_of

    space = SearchSpace({"n_hid_layers": Categorical((0, 1)), "n_hid_units": Categorical((32, 64)),
                         "learning_rate": Range(1e-4, 1e-2, log=True)},
                        {"n_hid_units": Condition("n_hid_layers", lambda v: int(v) > 0, 0, "n_hid_layers > 0")})
    assert point_of({"n_hid_layers": "1", "n_hid_units": "64", "learning_rate": "0.001"}, space) == \
        {"n_hid_layers": 1, "n_hid_units": 64, "learning_rate": 0.001}
    # an inactive conditional value is not part of the point
    assert point_of({"n_hid_layers": "0", "n_hid_units": "0", "learning_rate": "0.001"}, space) == \
        {"n_hid_layers": 0, "learning_rate": 0.001}
    assert point_of({"n_hid_layers": "1", "n_hid_units": "64", "learning_rate": "0.1"}, space) is None
    assert point_of({"n_hid_layers": "2", "n_hid_units": "64", "learning_rate": "0.001"}, space) is None
    assert point_of({"n_hid_layers": "1", "learning_rate": "0.001"}, space) is None


def test_auto_prunes_with_hyperband_where_a_budget_bounds_the_study():
    """A cut trial frees its epochs under a budget (Hyperband, the benchmark's winner there);
    under a trial count it still takes a trial, so only clear losers are cut (median)."""
    assert TuningConfig(budget_steps=100).pruner_name == "hyperband"
    assert TuningConfig(n_trials=10).pruner_name == "median"
    assert TuningConfig(budget_steps=100, pruner="median").pruner_name == "median"
    assert TuningConfig(pruner="none").pruner_name == "none"
