"""``bnet plot``: figures and movies from tracked runs."""

from __future__ import annotations

import click

from bnet.cli.options import resolve, store_option, tracking_uri_option


@click.group()
def plot():
    """Figures and movies from tracked runs."""


@plot.command()
@click.argument("run_id")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Movie file, .mp4 (ffmpeg) or .gif [default syllables-<run>.mp4, .gif without ffmpeg].")
@click.option("--clips", default=4, show_default=True, help="Clips per state, played one after another.")
@click.option("--min-frames", default=5, show_default=True, help="Shortest run of a state that makes a clip.")
@click.option("--fps", default=20, show_default=True)
@store_option
@tracking_uri_option
def syllables(run_id, out, clips, min_frames, fps, store, tracking_uri):
    """Write a syllable movie of an ARHMM run: clips of frames from each state."""
    import tempfile

    import matplotlib.animation as animation
    import numpy as np

    from bnet.data import open_session
    from bnet.data.exports import read_export
    from bnet.errors import TrackingError
    from bnet.plotting.movies import state_segments, write_panel_movie
    from bnet.tracking import conventions as tags
    from bnet.tracking.registry import download_artifact, resolve_upstream

    resolved = resolve(store, tracking_uri)
    run = resolve_upstream(run_id, "arhmm", store=resolved)
    with tempfile.TemporaryDirectory() as tmp:
        path = download_artifact(run, f"{tags.EXPORTS_DIR}/states.hdf5", tmp, resolved)
        if path is None:
            raise TrackingError(f"run {run.run_id} exported no states (export_states was off)")
        states, _ = read_export(path, "states")
    session = open_session(run.tags.get(tags.TAG_DATA_PATH, ""), require=("images",))
    if session.data_hash != run.tags.get(tags.TAG_DATA_HASH):
        raise TrackingError(f"{session.path} has changed since run {run.run_id} was fitted (data hash differs)")
    n_states = int(run.params["n_arhmm_states"])
    panels, titles = [], []
    for state in range(n_states):
        segments = state_segments(states, state, min_frames)[:clips]
        frames = [session.read("images", t)[start:stop, 0] for t, start, stop in segments]
        gap = [np.zeros((3, *session.image_shape[1:]))]
        panels.append(np.concatenate([part for clip in frames for part in (clip / 255.0, gap[0])])
                      if frames else np.zeros((1, *session.image_shape[1:])))
        titles.append(f"state {state} ({len(segments)} clips)")
    if out is None:
        out = f"syllables-{run.run_id[:8]}.{'mp4' if animation.writers.is_available('ffmpeg') else 'gif'}"
    written = write_panel_movie(panels, titles, out, fps)
    click.echo(f"wrote {written}: {n_states} states, up to {clips} clips each (channel 0)")
