"""Top-N ensembles of a study's finished decoder runs, N chosen on validation.

Members are the runs ranked by the validation metric; for N = 1 ... M the top-N members'
predictions are averaged and scored on val; the N with the best val score is kept, and its
held-out test score is reported beside the best single member's. The ensemble is logged as
its own run (members, N curve, predictions, a checkpoint that rebuilds it) and can be
registered. ``verify_ensemble`` recomputes its predictions from the members' own
checkpoints and checks them against what was logged.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from bnet.data.exports import read_export, write_export
from bnet.errors import BnetError, TrackingError
from bnet.models.ensemble import EnsembleConfig, EnsembleModel
from bnet.plotting.decoders import plot_ensemble_curve
from bnet.tracking import conventions as tags
from bnet.tracking.query import RunSummary, best_runs, get_run, study_objective, trial_families
from bnet.tracking.registry import download_artifact, load_model
from bnet.tracking.tracker import Tracker
from bnet.tracking.store import Store, resolve_store
from bnet.tuning.common import SPLIT_KEYS
from bnet.tuning.families.decoder import data_for_run, score_predictions

FAMILY = "ensemble"
MEMBERS_TAG = "bnet.ensemble.members"


@dataclass
class EnsembleOutcome:
    run_id: str
    n_members: int
    metric: str
    val_score: float
    test_score: float
    best_single_val: float
    best_single_test: float
    curve: list[tuple[int, float, float]]
    member_run_ids: list[str]


def _predictions(run: RunSummary, store: Store) -> dict[int, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        path = download_artifact(run, f"{tags.EXPORTS_DIR}/predictions.hdf5", tmp, store)
        if path is None:
            raise TrackingError(f"run {run.run_id} has no exports/predictions.hdf5")
        return read_export(path, "predictions")[0]


MEANINGLESS = {
    "ae": "averaging the latents or reconstructions of separately fitted AEs is meaningless: each AE has its own latent space",
    "arhmm": "averaging the states of separately fitted ARHMMs is meaningless: their state labels do not correspond",
}


def _refuse_non_decoders(experiment: str, store: Store) -> None:
    for family in trial_families(experiment, store):
        if family in MEANINGLESS:
            raise BnetError(f"experiment '{experiment}' holds {family} runs; {MEANINGLESS[family]}. "
                            f"Ensembles are built from decoder studies")


# What members must share, the parts of their fit identity that are not hyperparameters:
# averaging predictions of other data, targets, neuron subsets or upstream models (another
# AE's latents, another ARHMM's states), of decoders with encoders, or of fits whose
# held-out trials differ, scores them against the wrong targets or on trials they trained on.
_SHARED_TAGS = ((tags.TAG_DATA_HASH, "data digests"), (tags.TAG_TARGET, "targets"),
                (tags.TAG_NEURON_SUBSET, "neuron subsets"), (tags.TAG_TARGET_KIND, "kinds of target"),
                (tags.TAG_MODEL_CLASS, "model classes (a decoder and an encoder predict different things)"))
_SHARED_PARAMS = (*SPLIT_KEYS, "n_train_trials", "n_val_trials", "n_test_trials")


def _check_compatible(members: list[RunSummary]) -> None:
    first = members[0]
    upstream = sorted({k for run in members for k in run.tags if k.startswith(tags.UPSTREAM_TAG_PREFIX)})
    shared = list(_SHARED_TAGS) + [(k, f"upstream {k[len(tags.UPSTREAM_TAG_PREFIX):].replace('_run_id', '')} runs")
                                   for k in upstream]
    for run in members[1:]:
        differing = [(what, first.tags.get(tag), run.tags.get(tag)) for tag, what in shared
                     if run.tags.get(tag) != first.tags.get(tag)]
        differing += [(f"splits ({key})", first.params.get(key), run.params.get(key)) for key in _SHARED_PARAMS
                      if run.params.get(key) != first.params.get(key)]
        if differing:
            what, theirs, ours = differing[0]
            raise BnetError(f"runs {first.run_id} and {run.run_id} have different {what} "
                            f"({theirs} vs {ours}): they cannot be averaged; pick one study with --study")


def build_ensemble(experiment: str, study: str | None = None, max_members: int = 5, metric: str | None = None,
                   register_as: str | None = None, alias: str = "champion", store: Store | None = None,
                   echo=print) -> EnsembleOutcome:
    """Rank the finished decoder runs, pick N on val, log (and optionally register) the ensemble."""
    store = store or resolve_store()
    if max_members < 1:
        raise BnetError(f"--max-members must be at least 1, got {max_members}")
    _refuse_non_decoders(experiment, store)
    metric = metric or study_objective(experiment, "decoder", study, store=store)[0]
    if not metric.startswith("val_"):
        raise BnetError(f"--metric {metric}: an ensemble ranks its members and picks N by a validation score "
                        f"of predictions (val_r2, val_ll, val_accuracy), which are all better higher")
    # every score of predictions (R², log-likelihood, accuracy) is better higher
    members = best_runs(experiment, "decoder", max_members, study=study, metric=metric, direction="maximize",
                        store=store)
    if not members:
        raise TrackingError(f"no finished decoder runs of '{experiment}' have metric {metric}")
    _check_compatible(members)
    session, data = data_for_run(members[0], store)
    n_max_lags = max(int(run.params.get("n_max_lags", 0)) for run in members)
    split_metric = metric.split("_", 1)[1]
    predictions = [_predictions(run, store) for run in members]
    scorable = score_predictions(data, predictions[0], "val", n_max_lags)
    if metric not in scorable:
        raise BnetError(f"--metric {metric}: the members' predictions are scored as {', '.join(sorted(scorable))}")
    for run, predicted in zip(members, predictions):
        n_predicted = next(iter(predicted.values())).shape[1]
        if n_predicted != data.n_output:
            raise BnetError(f"decoder run {run.run_id} predicts {n_predicted} dimensions but its targets have "
                            f"{data.n_output}: its neuron subset or target cannot be rebuilt from the session")

    def averaged(n: int) -> dict[int, np.ndarray]:
        return {t: np.mean([p[t] for p in predictions[:n]], axis=0) for t in session.trials}

    curve = []
    for n in range(1, len(members) + 1):
        average = averaged(n)
        val = score_predictions(data, average, "val", n_max_lags)[f"val_{split_metric}"]
        test = score_predictions(data, average, "test", n_max_lags)[f"test_{split_metric}"]
        curve.append((n, val, test))
        echo(f"  top-{n}: {metric} {val:.4f}  test_{split_metric} {test:.4f}")
    chosen = max(curve, key=lambda row: (row[1], -row[0]))
    n_chosen = chosen[0]

    tracker = Tracker(store)
    experiment_id = tracker.experiment(experiment)
    upstream = {k: v for k, v in members[0].tags.items() if k.startswith(tags.UPSTREAM_TAG_PREFIX)}
    run = tracker.create_run(experiment_id, f"ensemble top-{n_chosen} of {study or experiment}", {
        tags.TAG_ROLE: FAMILY, tags.TAG_FAMILY: FAMILY, tags.TAG_DATASET: members[0].tags.get(tags.TAG_DATASET),
        tags.TAG_DATA_HASH: members[0].tags.get(tags.TAG_DATA_HASH), tags.TAG_DATA_PATH: str(session.path),
        tags.TAG_TARGET: members[0].tags.get(tags.TAG_TARGET), tags.TAG_TARGET_KIND: data.kind,
        tags.TAG_NEURON_SUBSET: members[0].tags.get(tags.TAG_NEURON_SUBSET, "all"),
        tags.TAG_MODEL_CLASS: members[0].tags.get(tags.TAG_MODEL_CLASS, ""),
        tags.TAG_OBJECTIVE: metric, tags.TAG_DIRECTION: "maximize",
        MEMBERS_TAG: ",".join(r.run_id for r in members[:n_chosen]),
        f"{tags.UPSTREAM_TAG_PREFIX}decoder_run_id": members[0].run_id, **upstream})
    try:
        run.log_params({"metric": metric, "max_members": max_members, "n_members": n_chosen,
                        "study": study or "", "n_max_lags": n_max_lags})
        for n, val, test in curve:
            run.log_metrics({f"curve_{metric}": val, f"curve_test_{split_metric}": test}, step=n)
        best_single = curve[0]
        run.log_metrics({metric: chosen[1], f"test_{split_metric}": chosen[2], "n_members": n_chosen,
                         f"best_single_{metric}": best_single[1], f"best_single_test_{split_metric}": best_single[2]})
        models = [load_model(r.run_id, store) for r in members[:n_chosen]]
        ensemble = EnsembleModel(EnsembleConfig(members=[asdict(m.config) for m in models],
                                                member_run_ids=[r.run_id for r in members[:n_chosen]]))
        for target, source in zip(ensemble.members, models):
            target.load_state_dict(source.state_dict())
        run.log_checkpoint(ensemble, {})
        with tempfile.TemporaryDirectory() as tmp:
            run.log_file(write_export(Path(tmp) / "predictions.hdf5", {"predictions": averaged(n_chosen)},
                                      data.splits, {"run_id": run.run_id}), tags.EXPORTS_DIR)
            members_file = Path(tmp) / "members.json"
            members_file.write_text(json.dumps([{"run_id": r.run_id, metric: r.metrics.get(metric)}
                                                for r in members[:n_chosen]], indent=2))
            run.log_file(members_file)
        run.log_figure(plot_ensemble_curve([c[0] for c in curve], [c[1] for c in curve], [c[2] for c in curve],
                                           n_chosen, metric), "ensemble_curve")
    except BaseException:
        run.terminate("FAILED")
        raise
    run.terminate("FINISHED")
    if register_as:
        from bnet.tracking.registry import register_run

        register_run(get_run(run.run_id, store), register_as, alias, store)
    return EnsembleOutcome(run.run_id, n_chosen, metric, chosen[1], chosen[2], curve[0][1], curve[0][2],
                           curve, [r.run_id for r in members[:n_chosen]])


def verify_ensemble(run_id: str, store: Store | None = None, atol: float = 1e-5) -> float:
    """Recompute an ensemble's predictions from its members' own checkpoints; return the
    largest difference from the logged predictions (raise if above ``atol``)."""
    store = store or resolve_store()
    run = get_run(run_id, store)
    if run.family != FAMILY:
        raise TrackingError(f"run {run_id} is a {run.family or 'non-bnet'} run, not an ensemble")
    member_ids = [m for m in run.tags.get(MEMBERS_TAG, "").split(",") if m]
    members = [get_run(m, store) for m in member_ids]
    _, data = data_for_run(members[0], store)
    logged = _predictions(run, store)
    recomputed: dict[int, list[np.ndarray]] = {t: [] for t in logged}
    for member in members:
        model = load_model(member.run_id, store)
        if getattr(model.config, "n_input", data.n_input) != data.n_input:
            raise BnetError(f"ensemble {run_id}: member {member.run_id} reads {model.config.n_input} inputs but its "
                            f"session and neuron subset give {data.n_input}: its inputs cannot be rebuilt")
        with torch.no_grad():
            for t in logged:
                recomputed[t].append(model.predict(torch.from_numpy(np.ascontiguousarray(data.inputs[t], np.float32))).numpy())
    difference = max(float(np.max(np.abs(np.mean(recomputed[t], axis=0) - logged[t]))) for t in logged)
    if difference > atol:
        raise BnetError(f"ensemble {run_id}: recomputed predictions differ from the logged ones by {difference:.3g} "
                        f"(more than {atol}); the logged ensemble does not match its members")
    return difference
