"""Tuned models on new recordings: latents, states and predictions of sessions a model never saw.

Each model is named as everywhere (a run id, ``models:/NAME@ALIAS``, ``best`` of an
experiment) and each new session becomes one MLflow run of family ``apply`` in the model's
experiment (or a named one), tagged with the model's run (``bnet.upstream.<family>_run_id``),
the session's digest and path, and whatever produced its input, so ``bnet lineage`` walks from
any written file back to the data every model was fitted to. The outputs are the run's
``exports/`` (the layout of a run's own exports: ``latents``, ``states`` and ``probs``, or
``predictions`` per trial, with ``splits`` drawn by the model's split settings over the new
trials) and, with ``out``, a copy named after the session. Each session's run also logs a
summary a user compares with the model's own fit to see a drift: an AE's reconstruction error
and the share of the session's frame variance it explains, an ARHMM's state usage and mean
state duration, a decoder's predictions' spread (and R^2 where the session has its target).

Frames are read one trial at a time (a session's frames are never all in memory; its outputs,
latents or states, are); ``n_workers`` spreads sessions over processes.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from bnet.data import open_session
from bnet.data.exports import read_export, write_export
from bnet.data.session import Session, file_digest, trial_name
from bnet.data.sessions import session_slug
from bnet.data.splits import TrialSplits, split_trials
from bnet.errors import BnetError, ConfigError, DataError
from bnet.models.arhmm.registered import LABEL_CLASSES
from bnet.models.serving import (
    FRAMES_PER_CHUNK, decoder_input_size, encode_frames, frame_shape, reads_labels, segment, serving_spec,
)
from bnet.plotting.arhmm import run_lengths
from bnet.progress import Echo, Progress, say
from bnet.tracking import conventions as tags
from bnet.tracking.lineage import run_of_file
from bnet.tracking.query import RunSummary, get_run
from bnet.tracking.registry import load_model, resolve_model_uri, resolve_upstream
from bnet.tracking.store import Store, resolve_store
from bnet.tracking.tracker import Tracker
from bnet.tuning.common import split_settings, upstream_export

FAMILY = "apply"
TAG_APPLIED = "bnet.applied_family"  # the family of the model an apply run used
TAG_MODEL_REFERENCE = "bnet.model_reference"  # the model as the user named it (models:/ae@champion)


@dataclass
class Applied:
    """One model applied to one session.

    Attributes:
        run_id: the apply run.
        family: the model's family (ae, arhmm, decoder).
        source: the session (or latents) file read.
        export: the run's artifact holding the outputs (``exports/latents.hdf5``, ...).
        files: copies written under ``out``.
        summary: what the run logged as metrics.
    """

    run_id: str
    family: str
    source: Path
    export: str
    files: list[Path] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    """What one process needs to apply a model to one session (picklable for workers)."""

    family: str
    model_run_id: str
    reference: str
    source: str
    experiment: str | None
    out: str | None
    name: str  # the session's name in ``out``
    input_run_id: str | None = None  # the apply run whose latents this job reads


@lru_cache(maxsize=4)
def _model(run_id: str, store: Store):
    """A model loaded once per process (a worker applies it to many sessions)."""
    return load_model(run_id, store)


# --- AE -------------------------------------------------------------------------------------

def check_frames(model, run: RunSummary, session: Session) -> None:
    """The session's frames (and labels) are what the AE reads; a DataError naming both otherwise."""
    if not model.exports_latents:
        raise ConfigError(f"AE run {run.run_id} is a {model.config.model_class}, which draws frames from labels and "
                          f"has no latents to compute")
    expected = frame_shape(model)
    if session.image_shape != expected:
        shown = "x".join(map(str, session.image_shape or ()))
        raise DataError(f"{session.path}: frames are {shown} (channels x y x x) but AE run {run.run_id} reads "
                        f"{'x'.join(map(str, expected))}: build the session with --y-pixels {expected[1]} "
                        f"--x-pixels {expected[2]}" + (" and the same views" if session.image_shape and
                                                        session.image_shape[0] != expected[0] else ""))
    if getattr(model.config, "fit_sess_io_layers", False) and int(model.config.n_sessions) > 1:
        raise DataError(f"AE run {run.run_id} has a first and last layer per session it was fitted to: a new "
                        f"session {session.path} has none (fit it with fit_sess_io_layers: false to apply it)")
    if reads_labels(model) and session.n_labels != model.config.n_labels:
        raise DataError(f"{session.path}: {session.n_labels or 'no'} label dimensions, but AE run "
                        f"{run.run_id} ({model.config.model_class}) reads {model.config.n_labels}")


@torch.no_grad()
def _apply_ae(model, run: RunSummary, session: Session, echo: Echo) -> tuple[dict, dict[str, float]]:
    """Latents of every trial and the reconstruction's error against the session's own frames."""
    model.eval()
    labels = reads_labels(model)
    latents: dict[int, np.ndarray] = {}
    squared_error = total = total_squares = 0.0
    n_frames = 0
    # a bar on a terminal; in a log the line each session ends with says enough
    progress = Progress(session.n_trials, f"  {session.path.name}", echo, unit="trial") if sys.stderr.isatty() else None
    for trial in session.trials:
        images = session.read("images", trial)
        trial_labels = session.read("labels", trial) if labels else None
        parts = []
        for start in range(0, len(images), FRAMES_PER_CHUNK):
            stop = start + FRAMES_PER_CHUNK
            frames = torch.from_numpy(images[start:stop]).float().div_(255.0)
            chunk_labels = (torch.from_numpy(np.nan_to_num(trial_labels[start:stop]).astype(np.float32))
                            if labels else None)
            code = encode_frames(model, frames, labels=chunk_labels)
            reconstruction = model.decode(code, None, chunk_labels).float()
            squared_error += float((reconstruction - frames).double().pow(2).sum())
            total += frames.double().sum(0)
            total_squares += frames.double().pow(2).sum(0)
            n_frames += len(frames)
            parts.append(code.numpy())
        latents[trial] = np.concatenate(parts)
        if progress is not None:
            progress.update(message=f"{n_frames} frames")
    if progress is not None:
        progress.close()
    n_values = n_frames * int(np.prod(session.image_shape))
    # the trivial answer on this session: its own mean frame (what a constant image at best achieves)
    spread = float((total_squares - total.pow(2) / n_frames).sum())
    mse = squared_error / n_values
    summary = {"mse": mse, "var_explained": 1 - squared_error / spread if spread > 0 else float("nan"),
               "n_frames": n_frames, "n_trials": session.n_trials}
    fitted = run.metrics.get("test_pixel_mse")
    if fitted and run.params.get("use_output_mask", "False") != "True":  # a masked figure is another measure
        summary["fitted_test_mse"] = fitted
        summary["mse_vs_fitted_test"] = mse / fitted
    return {"latents": latents}, summary


# --- ARHMM ----------------------------------------------------------------------------------

def check_latents(model, run: RunSummary, values: dict[int, np.ndarray], source: str) -> None:
    n_dims = model.engine.n_dims
    for trial, x in values.items():
        if x.ndim != 2 or x.shape[1] != n_dims:
            raise DataError(f"{source}: {trial_name(trial)} has {x.shape[-1] if x.ndim else 0}-dimensional inputs, "
                            f"but ARHMM run {run.run_id} segments {n_dims} dimensions")
        if len(x) <= model.config.n_arhmm_lags:
            raise DataError(f"{source}: {trial_name(trial)} has {len(x)} frames; ARHMM run {run.run_id}'s "
                            f"{model.config.n_arhmm_lags} lag(s) need more")
        if not np.all(np.isfinite(x)):
            raise DataError(f"{source}: {trial_name(trial)} holds NaN or infinite values")


def _apply_arhmm(model, values: dict[int, np.ndarray]) -> tuple[dict, dict[str, float]]:
    trials = sorted(values)
    states, probs = segment(model, [values[t] for t in trials])
    n_states = model.config.n_arhmm_states
    flat = np.concatenate(states)
    usage = np.bincount(flat, minlength=n_states) / len(flat)
    durations = [d for per_state in run_lengths(states, n_states) for d in per_state]
    summary = {"mean_state_duration": float(np.mean(durations)), "n_states_used": int((usage > 0).sum()),
               "ll_per_step": model.engine.log_likelihood_per_step([values[t].astype(np.float64) for t in trials]),
               "n_frames": int(len(flat)), "n_trials": len(trials),
               **{f"state_usage_{k}": float(u) for k, u in enumerate(usage)}}
    return {"states": dict(zip(trials, states)), "probs": dict(zip(trials, probs))}, summary


# --- decoders -------------------------------------------------------------------------------

def decoder_inputs(model, run: RunSummary, session: Session, store: Store) -> dict[int, np.ndarray]:
    """The session's neural activity as the decoder read it (its neuron subset), checked."""
    from bnet.tuning.families.decoder import ENCODERS, neurons_of_run

    if model.config.model_class in ENCODERS or run.tags.get(tags.TAG_MODEL_CLASS) in ENCODERS:
        raise ConfigError(f"run {run.run_id} is an encoder ({model.config.model_class}): bnet apply decoder runs "
                          f"decoders of neural activity")
    # an ensemble's members share one neuron subset, set by their params
    params = get_run(model.config.member_run_ids[0], store).params if run.family == "ensemble" else None
    neurons = neurons_of_run(run, session, params)
    n_neurons = session.n_neurons if neurons is None else len(neurons)
    if n_neurons != decoder_input_size(model):
        subset = f" in subset '{run.tags.get(tags.TAG_NEURON_SUBSET)}'" if neurons is not None else ""
        raise DataError(f"{session.path}: {n_neurons} neurons{subset}, but {run.family} run {run.run_id} reads "
                        f"{decoder_input_size(model)}")
    neural = dict(zip(session.trials, session.read_all("neural")))
    return {t: (x if neurons is None else x[:, neurons]).astype(np.float32) for t, x in neural.items()}


def _apply_decoder(model, run: RunSummary, session: Session,
                   inputs: dict[int, np.ndarray]) -> tuple[dict, dict[str, float]]:
    from bnet.models.decoder_metrics import r2_score, score_trials

    spec = serving_spec(model)
    predictions = {t: spec(model, x, f"{session.path} {trial_name(t)}")["predictions"] for t, x in inputs.items()}
    stacked = np.concatenate(list(predictions.values()))
    summary = {"n_frames": len(stacked), "n_trials": len(predictions),
               "prediction_std": float(stacked.std(0).mean())}
    if run.tags.get(tags.TAG_TARGET) == "labels" and "labels" in session.signals:
        true = [session.read("labels", t).astype(np.float32) for t in predictions]
        lags = int(run.params.get("n_max_lags") or getattr(model.config, "n_lags", 0) or 0)
        summary["r2"] = score_trials(r2_score, true, list(predictions.values()), lags)[0]
    return {"predictions": predictions}, summary


# --- one session ----------------------------------------------------------------------------

EXPORT_NAMES = {"ae": "latents", "arhmm": "states", "decoder": "predictions", "ensemble": "predictions"}


def apply_one(job: Job, store: Store, echo: Echo = say) -> Applied:
    """Apply one model to one session (or latents file) as one apply run."""
    run = get_run(job.model_run_id, store)
    model = _model(job.model_run_id, store)
    family = job.family
    source = Path(job.source).absolute()
    latents_run_id = job.input_run_id
    # everything is read and checked before the run exists: a file the model cannot read leaves no run
    if family == "arhmm" and (latents_run_id or _is_export(source)):
        # latents: of the session named (pipeline), or in the file itself
        session = open_session(source, require=()) if latents_run_id else None
        if latents_run_id:
            values = upstream_export(get_run(latents_run_id, store), "latents", "latents", session, store)[0]
        else:
            values = read_export(source, "latents")[0]
            latents_run_id = _writer(source)
    else:
        session = open_session(source, require=_required(family, model))
    if family == "ae":
        check_frames(model, run, session)
        trials = session.trials
    elif family == "arhmm":
        if session is not None and latents_run_id is None:  # a class fitted to labels
            values = {t: x.astype(np.float64) for t, x in zip(session.trials, session.read_all("labels"))}
        check_latents(model, run, values, str(source))
        trials = tuple(sorted(values))
    else:
        inputs = decoder_inputs(model, run, session, store)
        trials = session.trials
    splits = new_data_splits(trials, run, str(source))
    tracker = Tracker(store)
    experiment_id = tracker.experiment(job.experiment) if job.experiment else run.experiment_id
    digest = session.data_hash if session is not None else file_digest(source)
    run_tags = {
        tags.TAG_ROLE: FAMILY, tags.TAG_FAMILY: FAMILY, TAG_APPLIED: family,
        tags.TAG_MODEL_CLASS: model.config.model_class, TAG_MODEL_REFERENCE: job.reference,
        tags.TAG_DATA_PATH: str(source), tags.TAG_DATA_HASH: digest,
        tags.TAG_DATASET: session.dataset_id if session is not None else source.stem,
        f"{tags.UPSTREAM_TAG_PREFIX}{'decoder' if family == 'ensemble' else family}_run_id": run.run_id,
        **({f"{tags.UPSTREAM_TAG_PREFIX}latents_run_id": latents_run_id} if latents_run_id else {}),
    }
    name = f"apply {model.config.model_class} {run.run_id[:8]} to {job.name}"
    logger = tracker.create_run(experiment_id, name, run_tags)
    try:
        if family == "ae":
            outputs, summary = _apply_ae(model, run, session, echo)
        elif family == "arhmm":
            outputs, summary = _apply_arhmm(model, values)
        else:
            outputs, summary = _apply_decoder(model, run, session, inputs)
        logger.log_params({"model_run_id": run.run_id, "model_reference": job.reference, "data": str(source)})
        logger.log_metrics(summary)
        export = f"{EXPORT_NAMES[family]}.hdf5"
        files = []
        with tempfile.TemporaryDirectory() as tmp:
            path = write_export(Path(tmp) / export, outputs, splits,
                                {"run_id": logger.run_id, "model_run_id": run.run_id, "source": str(source),
                                 "data_hash": digest})
            logger.log_file(path, tags.EXPORTS_DIR)
            if job.out:
                target = Path(job.out) / f"{job.name}.{export}"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
                files.append(target)
    except BaseException as err:
        logger.set_tags({tags.TAG_ERROR: f"{type(err).__name__}: {err}"[:5000]})
        logger.terminate("FAILED")
        raise
    logger.terminate("FINISHED")
    return Applied(logger.run_id, family, source, f"{tags.EXPORTS_DIR}/{export}", files, summary)


def new_data_splits(trials: tuple[int, ...], run: RunSummary, source: str) -> TrialSplits:
    """Splits of new trials by the model's split settings (so a later study can read the
    outputs like a run's exports); a session shorter than one block of them is all test trials."""
    try:
        return split_trials(trials, **split_settings(run.params), source=source)
    except DataError:
        return TrialSplits((), (), tuple(trials))


def _writer(path: Path) -> str | None:
    """The run that wrote a latents file, where it says."""
    try:
        return run_of_file(path)
    except BnetError:
        return None


def _required(family: str, model) -> tuple[str, ...]:
    if family == "ae":
        return ("images", "labels") if reads_labels(model) else ("images",)
    if family == "arhmm":
        return ("labels",)
    return ("neural",)


def _is_export(path: Path) -> bool:
    """Whether ``path`` is a latents export (bnet apply ae's or an AE run's) rather than a session."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "latents" in f and "splits" in f
    except OSError:
        return False


# --- many sessions --------------------------------------------------------------------------

def _set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def _worker(job: Job, store: Store) -> Applied:
    return apply_one(job, store, echo=lambda line: None)


def run_jobs(jobs: list[Job], store: Store, n_workers: int = 1, echo: Echo = say) -> list[Applied]:
    """Every job, one after another or over ``n_workers`` processes, reporting each session as
    it ends; a session that fails is reported and the others go on (one error names them all)."""
    if n_workers < 1:
        raise ConfigError(f"--n-workers must be at least 1, got {n_workers}")
    results: list[Applied] = []
    failures: list[str] = []

    def report(applied: Applied) -> None:
        results.append(applied)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in applied.summary.items()
                          if k in ("mse", "var_explained", "mse_vs_fitted_test", "mean_state_duration",
                                   "n_states_used", "r2", "ll_per_step"))
        echo(f"[{len(results) + len(failures)}/{len(jobs)}] {applied.source.name}: {applied.family} -> run "
             f"{applied.run_id} {applied.export}" + (f" and {', '.join(map(str, applied.files))}" if applied.files
                                                     else "") + (f" ({shown})" if shown else ""))
        if applied.summary.get("var_explained", 1.0) <= 0:
            echo(f"  warning: the AE explains {100 * applied.summary['var_explained']:.1f}% of "
                 f"{applied.source.name}'s frame variance: no better than the session's own mean frame")

    def fail(job: Job, err: BaseException) -> None:
        if not isinstance(err, BnetError):
            raise err
        failures.append(f"{Path(job.source).name}: {err}")
        echo(f"[{len(results) + len(failures)}/{len(jobs)}] {Path(job.source).name}: failed: {err}")

    if n_workers == 1 or len(jobs) == 1:
        for job in jobs:
            try:
                report(apply_one(job, store, echo))
            except BnetError as err:
                fail(job, err)
    else:
        threads = max(1, (os.cpu_count() or 1) // n_workers)
        with ProcessPoolExecutor(min(n_workers, len(jobs)), mp_context=get_context("spawn"),
                                 initializer=_set_threads, initargs=(threads,)) as pool:
            futures = {pool.submit(_worker, job, store): job for job in jobs}
            for future in as_completed(futures):
                error = future.exception()
                if error is None:
                    report(future.result())
                else:
                    fail(futures[future], error)
        order = {job.source: i for i, job in enumerate(jobs)}
        results.sort(key=lambda a: order.get(str(a.source), 0))
    if failures:
        raise BnetError(f"{len(failures)} of {len(jobs)} file(s) failed ({len(results)} applied): "
                        + "; ".join(failures))
    return results


def session_names(paths: list[Path]) -> list[str]:
    """Each session's name in ``out``: its ``lab_expt_animal_session``, or its file's stem for a
    file that is not a session, with the data digest added where two would share a name."""
    names = []
    for path in paths:
        try:
            names.append(session_slug(open_session(path, require=())))
        except DataError:
            names.append(path.stem)
    if len(set(names)) < len(names):
        names = [f"{name}.{file_digest(path)[:8]}" for name, path in zip(names, paths)]
    return names


def resolve_model(reference: str, family: str, experiment: str | None, store: Store) -> RunSummary:
    """The finished model run ``reference`` names (``best`` ranks ``experiment``'s runs); a
    decoder may be an ensemble of decoders."""
    if reference == "best" and not experiment:
        raise ConfigError(f"{family} best needs --model-experiment NAME: the experiment whose runs to rank")
    if family != "decoder" or reference == "best":
        return resolve_upstream(reference, family, experiment, store=store)
    run = resolve_model_uri(reference, store)
    if run.family not in ("decoder", "ensemble") or run.status != "FINISHED":
        raise ConfigError(f"'{reference}' resolves to run {run.run_id}, a {run.status} {run.family or 'non-bnet'} "
                          f"run, not a finished decoder or ensemble")
    return run


def apply(family: str, reference: str, sources: list[str | Path], out: str | Path | None = None,
          experiment: str | None = None, model_experiment: str | None = None, store: Store | None = None,
          n_workers: int = 1, echo: Echo = say) -> list[Applied]:
    """Apply one model to each of ``sources``; the Python face of ``bnet apply ae|arhmm|decoder``.

    Args:
        family: ``ae`` (sources are sessions), ``arhmm`` (latents files written by ``bnet apply
            ae`` or exported by an AE run, or sessions' labels for a ``-labels`` class) or
            ``decoder`` (sessions with neural activity; a decoder or an ensemble).
        reference: the model: a run id, ``models:/NAME@ALIAS``, or ``best`` (of ``model_experiment``).
        sources: the new data, one session (or latents file) each.
        out: a folder for copies of the outputs, named after each session.
        experiment: the experiment of the apply runs (default: the model's).
        n_workers: processes sharing the sessions.
    """
    store = store or resolve_store()
    if not sources:
        raise ConfigError("nothing to apply the model to: name at least one --data (or --latents) file")
    run = resolve_model(reference, family, model_experiment, store)
    return _apply_run(family, run, reference, sources, out, experiment, store, n_workers, echo)


def _apply_run(family, run: RunSummary, reference: str, sources, out, experiment, store, n_workers, echo,
               input_run_ids: list[str] | None = None) -> list[Applied]:
    paths = [Path(s).absolute() for s in sources]
    for path in paths:
        if not path.exists():
            raise DataError(f"{path}: no such file")
    kind = "ensemble" if run.family == "ensemble" else family
    model_class = run.tags.get(tags.TAG_MODEL_CLASS, family)
    if kind == "arhmm" and input_run_ids is None and model_class not in LABEL_CLASSES:
        for path in paths:
            if not _is_export(path):
                raise DataError(f"{path}: not a latents file (ARHMM run {run.run_id} segments AE latents: pass "
                                f"--latents from bnet apply ae, or --data with bnet apply pipeline)")
    if kind == "arhmm" and model_class in LABEL_CLASSES and any(_is_export(path) for path in paths):
        raise DataError(f"ARHMM run {run.run_id} ({model_class}) segments a session's labels, not latents: "
                        f"pass --data SESSION")
    jobs = [Job(kind, run.run_id, reference, str(path), experiment, str(out) if out else None, name,
                input_run_ids[i] if input_run_ids else None)
            for i, (path, name) in enumerate(zip(paths, session_names(paths)))]
    echo(f"applying {model_class} run {run.run_id} ({reference}) to {len(jobs)} file(s)")
    return run_jobs(jobs, store, n_workers, echo)


def apply_pipeline(sources: list[str | Path], arhmm: str, ae: str | None = None, out: str | Path | None = None,
                   experiment: str | None = None, ae_experiment: str | None = None,
                   arhmm_experiment: str | None = None, store: Store | None = None, n_workers: int = 1,
                   echo: Echo = say) -> list[tuple[Applied, Applied]]:
    """Video sessions -> latents -> states: the ARHMM's own AE (from its lineage; ``ae``, if
    given, must name it) then the ARHMM, each session's two apply runs linked by lineage tags."""
    store = store or resolve_store()
    arhmm_run = resolve_model(arhmm, "arhmm", arhmm_experiment, store)
    own_ae = arhmm_run.tags.get(f"{tags.UPSTREAM_TAG_PREFIX}ae_run_id")
    if not own_ae:
        raise ConfigError(f"ARHMM run {arhmm_run.run_id} was fitted to labels, not to an AE's latents: apply it "
                          f"with bnet apply arhmm --data")
    ae_run = resolve_model(ae or own_ae, "ae", ae_experiment, store)
    if ae_run.run_id != own_ae:
        raise ConfigError(f"ARHMM run {arhmm_run.run_id} segments the latents of AE run {own_ae}, not of "
                          f"{ae_run.run_id}: another AE's latents mean something else")
    latents = _apply_run("ae", ae_run, ae or f"the AE of ARHMM run {arhmm_run.run_id}", sources, out, experiment,
                         store, n_workers, echo)
    states = _apply_run("arhmm", arhmm_run, arhmm, [a.source for a in latents], out, experiment, store, n_workers,
                        echo, input_run_ids=[a.run_id for a in latents])
    return list(zip(latents, states))
