"""Movies of tracked runs (``bnet plot ...``): a run id or registry URI in, an mp4 out.

Each movie resolves its run (and the runs upstream of it) by MLflow query, reads the session
the run was fitted to (refused if the file has changed since: its data hash differs), and
shows held-out (test) trials. :func:`log_movie` adds a written movie to the run's artifacts.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bnet.data import open_session
from bnet.data.exports import read_export
from bnet.data.session import Session, trial_name
from bnet.errors import TrackingError
from bnet.models.serving import FRAMES_PER_CHUNK
from bnet.plotting.movies import state_raster_frames, state_segments, write_panel_movie
from bnet.tracking import conventions as tags
from bnet.tracking.query import RunSummary
from bnet.tracking.registry import download_artifact, load_model, resolve_upstream
from bnet.tracking.store import Store, connect
from bnet.tuning.common import session_splits

MOVIES_DIR = "movies"


@dataclass
class Movie:
    """A movie written: where, of which run, and what it shows."""

    path: Path
    run: RunSummary
    description: str


def run_session(run: RunSummary, require: tuple[str, ...] = ("images",)) -> Session:
    """The session a run was fitted to, as it was then."""
    if run.tags.get(tags.TAG_N_SESSIONS, "1") != "1":
        raise TrackingError(f"run {run.run_id} was fitted to several sessions: movies show one session's run")
    session = open_session(run.tags.get(tags.TAG_DATA_PATH, ""), require=require)
    if session.data_hash != run.tags.get(tags.TAG_DATA_HASH):
        raise TrackingError(f"{session.path} has changed since run {run.run_id} was fitted (data hash differs)")
    return session


def held_out_trials(run: RunSummary, session: Session, n_trials: int) -> list[int]:
    return list(session_splits(session, run.params).test[:n_trials])


def channels_side_by_side(frames: np.ndarray) -> np.ndarray:
    """``(T, C, Y, X)`` -> ``(T, Y, C * X)``: every camera view in one panel."""
    return np.concatenate(list(frames.transpose(1, 0, 2, 3)), axis=2)


@torch.no_grad()
def _reconstruct(model, images: np.ndarray, latents: np.ndarray | None = None,
                 chunk: int = FRAMES_PER_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """(reconstruction, latents) of uint8 frames, or of the given latents, in chunks of frames."""
    reconstructions, codes = [], []
    for start in range(0, len(images) if latents is None else len(latents), chunk):
        if latents is None:
            code = model.encode(torch.from_numpy(images[start : start + chunk]).float().div_(255.0))
        else:
            code = torch.from_numpy(np.ascontiguousarray(latents[start : start + chunk], dtype=np.float32))
        reconstructions.append(model.decode(code).clamp(0, 1).numpy())
        codes.append(code.numpy())
    return np.concatenate(reconstructions), np.concatenate(codes)


def _ae_model(run: RunSummary, store: Store):
    model = load_model(run.run_id, store)
    if getattr(model.config, "model_class", "") not in ("ae", "vae", "beta-tcvae", "ps-vae", "cond-ae-msp"):
        raise TrackingError(f"run {run.run_id} is a {model.config.model_class}: these movies need an AE that "
                            f"encodes frames without labels (ae, vae, beta-tcvae, ps-vae, cond-ae-msp)")
    return model


def reconstruction_movie(reference: str, out: str | Path, store: Store, n_trials: int = 2, fps: int = 20,
                         experiment: str | None = None, data: str | Path | None = None) -> Movie:
    """Original | reconstruction | residual (grey is 0) of an AE's held-out trials, or of the
    first trials of ``data``, a session the model never saw.

    ``reference``: a run id, ``models:/NAME@ALIAS``, or ``best`` of ``experiment`` (as in
    every movie here)."""
    run = resolve_upstream(reference, "ae", experiment, store=store)
    model = _ae_model(run, store)
    session, trials, which = _shown_session(run, model, data, n_trials)
    panels = {"original": [], "reconstruction": [], "residual": []}
    for trial in trials:
        images = session.read("images", trial)
        reconstruction, _ = _reconstruct(model, images)
        original = images / 255.0
        panels["original"].append(channels_side_by_side(original))
        panels["reconstruction"].append(channels_side_by_side(reconstruction))
        panels["residual"].append(np.clip(0.5 + channels_side_by_side(reconstruction - original), 0, 1))
    path = write_panel_movie([np.concatenate(p) for p in panels.values()], list(panels), out, fps)
    return Movie(path, run, f"{len(trials)} {which} ({', '.join(map(trial_name, trials))}) of AE run "
                            f"{run.run_id}: original | reconstruction | residual")


def _shown_session(run: RunSummary, ae, data: str | Path | None, n_trials: int,
                   require: tuple[str, ...] = ("images",)) -> tuple[Session, list[int], str]:
    """The session a movie shows, its trials and what they are: the run's own held-out trials,
    or the first trials of ``data`` (checked against the AE ``ae``)."""
    if data is None:
        session = run_session(run, require)
        return session, held_out_trials(run, session, n_trials), "held-out trials"
    from bnet.apply.sessions import check_frames

    session = open_session(data, require=require)
    check_frames(ae, run, session)
    return session, list(session.trials[:n_trials]), f"trials of {session.path.name}, new to the model,"


def decoder_movie(reference: str, out: str | Path, store: Store, n_trials: int = 2, fps: int = 20,
                  experiment: str | None = None, data: str | Path | None = None) -> Movie:
    """Original | AE reconstruction | frames decoded from neural activity (the decoder's
    predicted latents through the AE's decoder), on held-out trials or on the first trials of
    ``data``, a session with frames and neural activity the models never saw."""
    run = resolve_upstream(reference, "decoder", experiment, store=store)
    if run.tags.get(tags.TAG_TARGET) != "ae":
        raise TrackingError(f"run {run.run_id} decodes {run.tags.get(tags.TAG_TARGET)}: decoder movies need a "
                            f"decoder of AE latents (--target ae)")
    ae_run = resolve_upstream(run.tags[f"{tags.UPSTREAM_TAG_PREFIX}ae_run_id"], "ae", store=store)
    model = _ae_model(ae_run, store)
    if data is None:
        session = run_session(run, ("images", "neural"))
        with tempfile.TemporaryDirectory() as tmp:
            path = download_artifact(run, f"{tags.EXPORTS_DIR}/predictions.hdf5", tmp, store)
            if path is None:
                raise TrackingError(f"decoder run {run.run_id} has no exports/predictions.hdf5")
            predictions, splits = read_export(path, "predictions")
        trials, which = list(splits.test[:n_trials]), "held-out trials"
    else:
        from bnet.apply.sessions import decoder_inputs

        session, trials, which = _shown_session(ae_run, model, data, n_trials, ("images", "neural"))
        decoder = load_model(run.run_id, store)
        inputs = decoder_inputs(decoder, run, session, store)
        predictions = {t: decoder.predict(torch.from_numpy(inputs[t])).numpy() for t in trials}
    panels = {"original": [], "AE reconstruction": [], "decoded from neural": []}
    for trial in trials:
        images = session.read("images", trial)
        panels["original"].append(channels_side_by_side(images / 255.0))
        panels["AE reconstruction"].append(channels_side_by_side(_reconstruct(model, images)[0]))
        panels["decoded from neural"].append(channels_side_by_side(_reconstruct(model, images,
                                                                               predictions[trial])[0]))
    path = write_panel_movie([np.concatenate(p) for p in panels.values()], list(panels), out, fps)
    return Movie(path, run, f"{len(trials)} {which} of decoder run {run.run_id} (AE run {ae_run.run_id}): "
                            f"original | AE reconstruction | decoded from neural")


def traversal_movie(reference: str, out: str | Path, store: Store, fps: int = 15,
                    experiment: str | None = None) -> Movie:
    """Each latent swept between its 5th and 95th percentile over the training frames."""
    from bnet.plotting.ps_vae import write_traversal_movie

    run = resolve_upstream(reference, "ae", experiment, store=store)
    session = run_session(run)
    model = _ae_model(run, store)
    latents = np.concatenate([_reconstruct(model, session.read("images", t))[1]
                              for t in session_splits(session, run.params).train])
    path = write_traversal_movie(model, np.median(latents, axis=0), latents, out, fps=fps)
    return Movie(path, run, f"latent traversals of {model.config.model_class} run {run.run_id}")


def syllable_movie(reference: str, out: str | Path, store: Store, clips: int = 4, min_frames: int = 5,
                   fps: int = 20, experiment: str | None = None, data: str | Path | None = None) -> Movie:
    """One panel per ARHMM state: clips of the frames where it held, in the run's own session
    or in ``data``, a video session the models never saw (its states found by the ARHMM over
    the latents of the ARHMM's own AE)."""
    run = resolve_upstream(reference, "arhmm", experiment, store=store)
    if data is None:
        with tempfile.TemporaryDirectory() as tmp:
            path = download_artifact(run, f"{tags.EXPORTS_DIR}/states.hdf5", tmp, store)
            if path is None:
                raise TrackingError(f"run {run.run_id} exported no states (export_states was off)")
            states, _ = read_export(path, "states")
        session, where = run_session(run), "its session"
    else:
        from bnet.models.serving import encode_session, segment

        ae_id = run.tags.get(f"{tags.UPSTREAM_TAG_PREFIX}ae_run_id")
        if not ae_id:
            raise TrackingError(f"ARHMM run {run.run_id} segments labels: syllables of new video need an ARHMM of "
                                f"AE latents")
        ae_run = resolve_upstream(ae_id, "ae", store=store)
        ae = _ae_model(ae_run, store)
        session, _, _ = _shown_session(ae_run, ae, data, 0)  # _ae_model: an AE that reads frames alone
        latents = encode_session(ae, session, torch.device("cpu"))
        paths, _ = segment(load_model(run.run_id, store), [latents[t] for t in session.trials])
        states, where = dict(zip(session.trials, paths)), f"{session.path.name}, new to the models"
    n_states = int(run.params["n_arhmm_states"])
    panels, titles = [], []
    gap = np.zeros((3, session.image_shape[1], session.image_shape[0] * session.image_shape[2]))
    for state in range(n_states):
        segments = state_segments(states, state, min_frames)[:clips]
        parts = [channels_side_by_side(session.read("images", t)[start:stop] / 255.0) for t, start, stop in segments]
        panels.append(np.concatenate([p for part in parts for p in (part, gap)]) if parts else gap[:1])
        titles.append(f"state {state} ({len(segments)} clips)")
    path = write_panel_movie(panels, titles, out, fps)
    return Movie(path, run, f"{n_states} states of ARHMM run {run.run_id} in {where}, up to {clips} clips each")


def bayesian_movie(reference: str, out: str | Path, store: Store, n_trials: int = 2, fps: int = 20,
                   experiment: str | None = None, n_draws: int = 2) -> Movie:
    """Original | AE reconstruction | direct decoder | Bayesian posterior mean | posterior draws,
    all through the AE's decoder, and the states around the current frame (the ARHMM's own, the
    state decoder's, the Bayesian path), on held-out trials of a Bayesian decoder run."""
    run = resolve_upstream(reference, "bayesian-decoder", experiment, store=store)
    arhmm_run = resolve_upstream(run.tags[f"{tags.UPSTREAM_TAG_PREFIX}arhmm_run_id"], "arhmm", store=store)
    ae_run = resolve_upstream(arhmm_run.tags[f"{tags.UPSTREAM_TAG_PREFIX}ae_run_id"], "ae", store=store)
    model = _ae_model(ae_run, store)
    session = run_session(run, ("images", "neural"))
    with tempfile.TemporaryDirectory() as tmp:
        path = download_artifact(run, f"{tags.EXPORTS_DIR}/posterior.hdf5", tmp, store)
        if path is None:
            raise TrackingError(f"Bayesian decoder run {run.run_id} has no exports/posterior.hdf5")
        (means, splits), (draws, _), (direct, _), (direct_probs, _), (paths, _) = (
            read_export(path, group) for group in ("means", "samples", "direct", "direct_probs", "viterbi"))
        states_path = download_artifact(arhmm_run, f"{tags.EXPORTS_DIR}/states.hdf5", tmp, store)
        if states_path is None:
            raise TrackingError(f"ARHMM run {arhmm_run.run_id} exported no states")
        states, _ = read_export(states_path, "states")
    n_states = int(arhmm_run.params["n_arhmm_states"])
    trials = list(splits.test[:n_trials])
    n_shown = min(n_draws, len(draws[trials[0]]))
    titles = ["original", "AE reconstruction", "direct decoder", "posterior mean",
              *(f"posterior draw {k + 1}" for k in range(n_shown)), "states: ARHMM / decoder / Bayesian"]
    panels: list[list[np.ndarray]] = [[] for _ in titles]
    for trial in trials:
        images = session.read("images", trial)
        shown = [images / 255.0, _reconstruct(model, images)[0], _reconstruct(model, images, direct[trial])[0],
                 _reconstruct(model, images, means[trial])[0],
                 *(_reconstruct(model, images, draws[trial][k])[0] for k in range(n_shown))]
        for panel, frames in zip(panels, shown):
            panel.append(channels_side_by_side(frames))
        panels[-1].append(state_raster_frames([states[trial], direct_probs[trial].argmax(-1), paths[trial]], n_states))
    path = write_panel_movie([np.concatenate(p) for p in panels], titles, out, fps)
    return Movie(path, run, f"{len(trials)} held-out trials of Bayesian decoder run {run.run_id} (AE run "
                            f"{ae_run.run_id}): {' | '.join(titles)}")


SAMPLE_BURN_IN = 20
"""Sampled frames dropped at the start: the ARHMM's first lags are drawn from N(0, I)."""


def sample_movie(reference: str, out: str | Path, store: Store, n_trials: int = 1, fps: int = 20,
                 experiment: str | None = None) -> Movie:
    """Real vs sampled latents, through the AE's decoder: a held-out trial's own latents
    beside latents the ARHMM generates (its states in the title of neither: the panels are
    judged by eye, as BehaveNet's were)."""
    run = resolve_upstream(reference, "arhmm", experiment, store=store)
    ae_id = run.tags.get(f"{tags.UPSTREAM_TAG_PREFIX}ae_run_id")
    if not ae_id:
        raise TrackingError(f"ARHMM run {run.run_id} segments labels: sampled frames need an ARHMM of AE latents")
    ae_run = resolve_upstream(ae_id, "ae", store=store)
    session = run_session(run)
    model = _ae_model(ae_run, store)
    segmentation = load_model(run.run_id, store).engine
    trials = held_out_trials(ae_run, session, n_trials)
    real = [_reconstruct(model, session.read("images", t))[0] for t in trials]
    n_frames = sum(len(r) for r in real)
    _, sampled = segmentation.sample(n_frames + SAMPLE_BURN_IN)
    generated = _reconstruct(model, np.zeros((0,)), sampled[0, SAMPLE_BURN_IN:].cpu().numpy())[0]
    panels = [np.concatenate([channels_side_by_side(r) for r in real]), channels_side_by_side(generated)]
    path = write_panel_movie(panels, ["real latents", "sampled latents"], out, fps)
    return Movie(path, run, f"{n_frames} frames of real vs ARHMM-sampled latents of ARHMM run {run.run_id} "
                            f"(AE run {ae_run.run_id})")


def log_movie(movie: Movie, store: Store) -> str:
    """Add the movie to its run's artifacts (``movies/``); returns the artifact path."""
    connect(store).log_artifact(movie.run.run_id, str(movie.path), MOVIES_DIR)
    return f"{MOVIES_DIR}/{movie.path.name}"
