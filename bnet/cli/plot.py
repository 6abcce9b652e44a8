"""``bnet plot``: movies of tracked runs (a run id or registry URI in, an mp4 out)."""

from __future__ import annotations

import click

from bnet.cli.options import resolve, store_option, tracking_uri_option


@click.group()
def plot():
    """Movies of tracked runs: reconstructions, decoders, syllables, sampled latents, traversals,
    Bayesian decoders."""


def movie_options(default_fps: int):
    def decorate(command):
        for option in reversed((
            click.argument("reference", metavar="REF"),  # a run id, models:/NAME@ALIAS or best
            click.option("--out", type=click.Path(dir_okay=False), required=True,
                         help="The movie: .mp4 (ffmpeg, bundled by imageio-ffmpeg) or .gif."),
            click.option("--log", is_flag=True, help="Also add it to the run's artifacts (movies/)."),
            click.option("--fps", default=default_fps, show_default=True),
            click.option("--experiment", default=None, help="The experiment that REF best ranks."),
            store_option, tracking_uri_option,
        )):
            command = option(command)
        return command
    return decorate


new_data_option = click.option("--data", type=click.Path(dir_okay=False), default=None,
                               help="A session the model never saw, shown instead of the run's own.")


def _finish(movie, log, store) -> None:
    click.echo(f"wrote {movie.path}: {movie.description}")
    if log:
        from bnet.plotting.run_movies import log_movie

        click.echo(f"  logged as {log_movie(movie, store)} of run {movie.run.run_id}")


@plot.command()
@movie_options(20)
@click.option("--trials", default=2, show_default=True, help="Held-out trials shown, one after another.")
@new_data_option
def reconstruction(reference, out, log, fps, experiment, store, tracking_uri, trials, data):
    """AE movie: original | reconstruction | residual on held-out trials, or on a new session's
    (REF: an AE run id or models:/NAME@ALIAS)."""
    from bnet.plotting.run_movies import reconstruction_movie

    resolved = resolve(store, tracking_uri)
    _finish(reconstruction_movie(reference, out, resolved, trials, fps, experiment, data), log, resolved)


@plot.command()
@movie_options(20)
@click.option("--trials", default=2, show_default=True, help="Held-out trials shown, one after another.")
@new_data_option
def decoder(reference, out, log, fps, experiment, store, tracking_uri, trials, data):
    """Decoder movie: original | AE reconstruction | frames decoded from neural activity
    (REF: a decoder run of AE latents)."""
    from bnet.plotting.run_movies import decoder_movie

    resolved = resolve(store, tracking_uri)
    _finish(decoder_movie(reference, out, resolved, trials, fps, experiment, data), log, resolved)


@plot.command()
@movie_options(20)
@click.option("--clips", default=4, show_default=True, help="Clips per state, played one after another.")
@click.option("--min-frames", default=5, show_default=True, help="Shortest run of a state that makes a clip.")
@new_data_option
def syllables(reference, out, log, fps, experiment, store, tracking_uri, clips, min_frames, data):
    """ARHMM movie: clips of the frames of each state (REF: an ARHMM run)."""
    from bnet.plotting.run_movies import syllable_movie

    resolved = resolve(store, tracking_uri)
    _finish(syllable_movie(reference, out, resolved, clips, min_frames, fps, experiment, data), log, resolved)


@plot.command("bayesian-decoder")
@movie_options(20)
@click.option("--trials", default=2, show_default=True, help="Held-out trials shown, one after another.")
def bayesian_decoder(reference, out, log, fps, experiment, store, tracking_uri, trials):
    """Bayesian decoder movie: original | AE reconstruction | direct decoder | posterior mean |
    posterior draws (REF: a bayesian-decoder run)."""
    from bnet.plotting.run_movies import bayesian_movie

    resolved = resolve(store, tracking_uri)
    _finish(bayesian_movie(reference, out, resolved, trials, fps, experiment), log, resolved)


@plot.command()
@movie_options(15)
def traversal(reference, out, log, fps, experiment, store, tracking_uri):
    """Latent traversal movie: one panel per latent swept between its 5th and 95th
    percentile (REF: an AE run, e.g. a PS-VAE)."""
    from bnet.plotting.run_movies import traversal_movie

    resolved = resolve(store, tracking_uri)
    _finish(traversal_movie(reference, out, resolved, fps, experiment), log, resolved)


@plot.command()
@movie_options(20)
@click.option("--trials", default=1, show_default=True, help="Held-out trials of real latents (and as many "
              "sampled frames).")
def samples(reference, out, log, fps, experiment, store, tracking_uri, trials):
    """ARHMM movie: frames decoded from a held-out trial's real latents beside frames decoded
    from latents the ARHMM samples (REF: an ARHMM run of AE latents)."""
    from bnet.plotting.run_movies import sample_movie

    resolved = resolve(store, tracking_uri)
    _finish(sample_movie(reference, out, resolved, trials, fps, experiment), log, resolved)
